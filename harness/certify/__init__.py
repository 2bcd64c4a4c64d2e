"""Certified lower bounds on Wasserstein robust accuracy.

Every figure an attack produces is an upper bound on robust accuracy; a
certificate proves that no image of the ball changes the prediction, which
bounds it from below. Two certifiers (:class:`~harness.vocabulary.Certifier`):

``linear_bounds`` (:mod:`.bounds`)
    Incomplete and fast: the first layer's pre-activations bounded exactly by
    the support function of the ball (:mod:`solvers.support`), then linear
    ReLU relaxations back-substituted to the input and concretized over the
    ball again (CROWN, Zhang et al. 2018, with the ball in place of a box).
``milp`` (:mod:`.milp`)
    Complete for small networks and radii: the ball as a polytope of local
    plans and each unstable ReLU as a binary variable (Tjeng, Xiao, Tedrake
    2019), solved by HiGHS with a time limit per example.

Both decide with a safety margin (:mod:`.safety`, and for the MILP
:func:`.milp.highs_error_bound`): a margin bound certifies only above a bound
on the model's own rounding, the bound's rounding and the solver's
tolerances. Both read a model through
:func:`.network.check_certifiable`, which the run's preflight uses too, and
every layer through its rule in the one table :data:`.layers.RULES` (interval
rule, linear relaxation, MILP encoding; the interval bounds of certified
training are its :func:`.layers.interval_bounds`). Both bound over one
perturbation, :class:`.perturbation.WassersteinBall`, whose
:meth:`~.perturbation.WassersteinBall.concretize` is the ball's support
function and whose :meth:`~.perturbation.WassersteinBall.encode` is its
polytope in a :class:`.program.Program`.
"""
