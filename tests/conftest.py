"""Shared generators and independent checks for the Sinkhorn and registry tests.

Problems are generated, never loaded: digit-like images (a few Gaussian
strokes per channel, clipped at a peak value so that some pixels saturate,
with exact zeros in the background), and targets ``w`` obtained by pushing
``x`` in a random direction (signed steps or Gaussian noise).

Feasibility is always judged by the *independent* exact LP of
:func:`solvers.exact.local_ot_distance`, never by the solver's own numbers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from solvers.exact import local_ot_distance

# Slack of the exact-LP checks.
REL_COST = 1e-3  # relative slack on the radius (the acceptance level)
REL_MASS = 1e-4  # undelivered / unused / mass mismatch, relative to m(x)
ABS_COST = {torch.float32: 1e-6, torch.float64: 1e-12}
BOX_SLACK = 1e-6


def digit_like(rng: np.random.Generator, shape, peak: float = 1.0, strokes: int = 3) -> np.ndarray:
    """A sparse ``(C, H, W)`` image in ``[0, peak]`` shaped like a handwritten stroke.

    Gaussian blobs along short random segments, scaled so that the brightest
    pixels exceed ``peak`` and are clipped to it (saturated pixels, as in
    MNIST), background below 12% of the peak set to exactly 0.
    """
    channels, height, width = shape
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.zeros(shape)
    for c in range(channels):
        for _ in range(strokes):
            r0, c0 = rng.uniform(0, height - 1), rng.uniform(0, width - 1)
            r1, c1 = r0 + rng.uniform(-2, 2), c0 + rng.uniform(-2, 2)
            width_ = rng.uniform(0.5, 1.0)
            for t in np.linspace(0, 1, 4):
                r, s = (1 - t) * r0 + t * r1, (1 - t) * c0 + t * c1
                image[c] += np.exp(-((rows - r) ** 2 + (cols - s) ** 2) / (2 * width_**2))
        image[c] *= 1.3 / image[c].max()
    image = np.clip(image, 0.0, 1.0) * peak
    image[image < 0.12 * peak] = 0.0
    return image


def digit_batch(seed: int, batch: int, shape, peak: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([digit_like(rng, shape, peak) for _ in range(batch)])


def push(x: np.ndarray, seed: int, kind: str = "sign", size: float = 0.1) -> np.ndarray:
    """Target ``w``: ``x + size * sign(noise)`` or ``x + size * noise`` (Gaussian)."""
    noise = np.random.default_rng(seed).standard_normal(x.shape)
    if kind == "sign":
        return x + size * np.sign(noise)
    if kind == "gauss":
        return x + size * noise
    raise ValueError(kind)


def mixed_push(x: np.ndarray, seed: int, size: float = 0.1) -> np.ndarray:
    """Signed steps for even examples, Gaussian noise for odd ones."""
    w = push(x, seed, "sign", size)
    w[1::2] = push(x, seed + 1, "gauss", size)[1::2]
    return w


def tensor(a, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def exact_check(x, z, eps, kernel_size, p, *, box=False, dtype=torch.float64, solver_cost=None):
    """Assert that ``z`` lies in the ball of radius ``eps`` around ``x`` (one example).

    Uses only the exact LP. Returns the :class:`TransportResult` for further checks.
    """
    x64 = np.asarray(torch.as_tensor(x).detach().cpu().double())
    z64 = np.asarray(torch.as_tensor(z).detach().cpu().double())
    assert np.isfinite(z64).all(), "z has NaN or inf entries"
    mass = x64.sum()
    assert z64.min() >= 0.0, f"z has negative entries (min {z64.min():.3g})"
    if box:
        assert z64.max() <= 1.0 + BOX_SLACK, f"box violated: max z = {z64.max():.9g}"
    assert abs(z64.sum() - mass) <= REL_MASS * mass, f"mass changed: m(z)={z64.sum():.9g}, m(x)={mass:.9g}"
    result = local_ot_distance(x64, z64, kernel_size, p)
    assert result.undelivered_mass <= REL_MASS * mass, f"undelivered mass {result.undelivered_mass:.3g} of {mass:.3g}"
    assert result.unused_mass <= REL_MASS * mass, f"unused mass {result.unused_mass:.3g} of {mass:.3g}"
    limit = float(eps) * (1 + REL_COST) + ABS_COST[dtype]
    assert result.cost <= limit, f"exact distance {result.cost:.9g} exceeds eps={float(eps):.6g}"
    if solver_cost is not None:
        # The solver's own plan is one feasible plan: its cost bounds the optimum.
        bound = float(solver_cost) * (1 + (1e-5 if dtype == torch.float32 else 1e-9)) + ABS_COST[dtype]
        assert result.cost <= bound, f"exact distance {result.cost:.9g} above the solver's plan cost {float(solver_cost):.9g}"
    return result


def exact_check_batch(x, z, eps, kernel_size, p, *, box=False, info=None):
    dtype = z.dtype if isinstance(z, torch.Tensor) else torch.float64
    batch = x.shape[0]
    eps_list = torch.as_tensor(eps, dtype=torch.float64).expand(batch).tolist()
    results = []
    for b in range(batch):
        cost = None if info is None else info.transport_cost[b]
        try:
            results.append(exact_check(x[b], z[b], eps_list[b], kernel_size, p, box=box, dtype=dtype, solver_cost=cost))
        except AssertionError as error:
            raise AssertionError(f"example {b} (eps={eps_list[b]}): {error}") from None
    return results


def assert_info_finite(info) -> None:
    for name, value in info.to_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"info.{name} has non-finite entries: {value}"


@pytest.fixture(scope="module")
def single_thread():
    """Run torch on one intra-op thread for the duration of a test module.

    The problems here are tiny (at most a few hundred pixels), so one thread is
    as fast as two; and when another process keeps a core busy, torch's
    two-thread depthwise conv2d on such tensors was measured 100-500x slower
    (0.03 s -> 15 s for one 50-iteration solve on this 2-core machine).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The synthetic world of :mod:`synthetic`, its plugin imported once for the whole session.

    Importing the plugin registers ``mnist/tiny_synthetic`` in the process's
    model registry. A second world would write a second plugin file
    registering the same name, which the registry refuses, so every test
    that needs the model shares this one fixture.
    """
    import zoo
    from synthetic import make_world  # not at the top: synthetic imports this module

    synthetic_world = make_world(tmp_path_factory.mktemp("world"))
    zoo.import_plugins([str(synthetic_world.plugin)])
    return synthetic_world


@pytest.fixture(scope="module")
def published_folders():
    """``(DATA_ROOT, WEIGHTS_DIR)``: MNIST and the paper's published weights; the test skips without them."""
    missing = [variable for variable in ("DATA_ROOT", "WEIGHTS_DIR") if not os.environ.get(variable)]
    if missing:
        pytest.skip(f"set {' and '.join(missing)} to run on the paper's published MNIST models")
    return os.environ["DATA_ROOT"], os.environ["WEIGHTS_DIR"]
