"""The agency-side gateway (the appliance), in wings that each hold one concern:

- ``gateway.api``: the agency API that back offices call over mutual TLS (servicer, caller authentication);
- ``gateway.procedure``: the verification procedure of a commission (intake, reviews, approvals, staff register,
  routing to units, the report);
- ``gateway.exchange``: moving query batches to the units and answers back (outbox, engine, transport, scheduler);
- ``gateway.archive``: the tamper-evident record of every staff action and message (clause 17);
- ``gateway.db``: the schema and its Alembic migrations.

``gateway.config``, ``gateway.server``, ``gateway.metrics`` and ``gateway.cli`` assemble the wings into the
running appliance. The gateway never imports ``connectors``: the two sides are installed by different
organisations and meet only on the wire.
"""

__all__: list[str] = []
