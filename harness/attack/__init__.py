"""The science: the threat model (:class:`~harness.attack.ball.Ball`), the PGD loop and its
protocols and schedules, exact verification, and evaluation in batches."""
