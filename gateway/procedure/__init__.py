"""The verification procedure (Procedure III–V of 吉民发〔2017〕58号): a commission's intake, second review, dual
approval and report, the staff register that decides who may do each step, and the routing of data categories to
the units that hold them."""

__all__: list[str] = []
