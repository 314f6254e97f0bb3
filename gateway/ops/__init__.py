"""The gateway as something an operator runs and keeps: the guard that gives each replica id to one live process
(``replica``), and backup and restore of its database, keystore and audit head (``backup``, ``restore``)."""
