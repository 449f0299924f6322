"""beamlet.rl's numpy models: backward passes against finite differences, Adam."""
import numpy as np
import pytest

from beamlet.contrib.rl.models import (MLP, Adam, Categorical, DiagGaussian, NumpyModel)


def numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        hi = f()
        x[i] = old - eps
        lo = f()
        x[i] = old
        g[i] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("activation", ["tanh", "relu", "linear"])
def test_mlp_backward_matches_finite_differences(activation):
    rng = np.random.default_rng(0)
    net = MLP([3, 5, 4, 2], activation, rng=rng, out_gain=1.0)
    x = rng.standard_normal((6, 3))
    w = rng.standard_normal((6, 2))

    def loss():
        return float((net.forward(x)[0] * w).sum())

    out, cache = net.forward(x)
    grads = net.backward(cache, w)
    for p, g in zip(net.params, grads):
        np.testing.assert_allclose(g, numeric_grad(loss, p), rtol=1e-5, atol=1e-7)


def test_categorical_logp_and_entropy_gradients():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 4))
    actions = rng.integers(0, 4, size=5)
    w = rng.standard_normal(5)
    analytic = Categorical(logits).d_logp(actions) * w[:, None]
    np.testing.assert_allclose(
        analytic, numeric_grad(lambda: float((Categorical(logits).logp(actions) * w).sum()),
                               logits), atol=1e-7)
    analytic = Categorical(logits).d_entropy() * w[:, None]
    np.testing.assert_allclose(
        analytic, numeric_grad(lambda: float((Categorical(logits).entropy() * w).sum()),
                               logits), atol=1e-7)
    p = Categorical(logits).p
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_diag_gaussian_logp_and_entropy_gradients():
    rng = np.random.default_rng(2)
    inputs = rng.standard_normal((5, 6)) * 0.5
    actions = rng.standard_normal((5, 3))
    w = rng.standard_normal(5)
    analytic = DiagGaussian(inputs).d_logp(actions) * w[:, None]
    np.testing.assert_allclose(
        analytic, numeric_grad(lambda: float((DiagGaussian(inputs).logp(actions) * w).sum()),
                               inputs), atol=1e-6)
    analytic = DiagGaussian(inputs).d_entropy() * w[:, None]
    np.testing.assert_allclose(
        analytic, numeric_grad(lambda: float((DiagGaussian(inputs).entropy() * w).sum()),
                               inputs), atol=1e-6)


@pytest.mark.parametrize("free_log_std", [False, True])
def test_actor_critic_model_backward(free_log_std):
    rng = np.random.default_rng(3)
    model = NumpyModel(4, {"pi": 4, "vf": 1}, hiddens=(8,), free_log_std=free_log_std, seed=0,
                       pi_out_gain=1.0)
    obs = rng.standard_normal((7, 4))
    w_pi = rng.standard_normal((7, 4))
    w_vf = rng.standard_normal(7)

    def loss():
        out = model(obs)
        return float((out["pi"] * w_pi).sum() + (out["vf"] * w_vf).sum())

    out, cache = model.forward(obs)
    grads = model.backward(cache, {"pi": w_pi, "vf": w_vf})
    assert len(grads) == len(model.params)
    for p, g in zip(model.params, grads):
        np.testing.assert_allclose(g, numeric_grad(loss, p), rtol=1e-5, atol=1e-7)


def test_adam_minimises_a_quadratic():
    target = np.array([3.0, -2.0, 0.5])
    x = np.zeros(3)
    opt = Adam([x], lr=0.05)
    for _ in range(2000):
        opt.step([2 * (x - target)])
    np.testing.assert_allclose(x, target, atol=1e-3)


def test_adam_clips_the_global_norm_and_rejects_bad_input():
    x = np.zeros(2)
    opt = Adam([x], lr=0.1, grad_clip=1.0)
    assert opt.step([np.array([30.0, 40.0])]) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="gradients for 1 parameters"):
        opt.step([np.zeros(2), np.zeros(2)])
    with pytest.raises(ValueError, match="lr must be positive"):
        Adam([x], lr=0)


def test_flat_weights_round_trip():
    model = NumpyModel(3, {"pi": 2}, hiddens=(4,), seed=0)
    flat = model.get_flat()
    assert flat.size == model.num_params()
    model.set_flat(np.zeros_like(flat))
    assert not model.get_flat().any()
    model.set_flat(flat)
    np.testing.assert_array_equal(model.get_flat(), flat)
    with pytest.raises(ValueError, match="flat vector"):
        model.set_flat(np.zeros(3))
