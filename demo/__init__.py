"""Not part of the appliance: a loopback verification network for the demo, the process-level tests and the
benchmarks (``demo.localnet``), and the walk-through of one commission that ``make demo`` runs (``demo.run``)."""

__all__: list[str] = []
