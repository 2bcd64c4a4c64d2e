"""The science: the threat model (:class:`~harness.attack.ball.Ball`), the PGD loop and its
protocols and schedules, exact verification, evaluation in batches, and the checks on the model
under attack (:mod:`~harness.attack.model_checks`)."""
