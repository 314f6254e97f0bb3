"""The exchange with the sharing units: the outbox of query batches, the engine that sends them and polls for
answers, the transport to each unit's connector, and the scheduler that drives both (clause 12 deadlines)."""

__all__: list[str] = []
