"""Long steps are visible: with ``progress=True`` a fit, a CG solve, block CG and Lanczos show
tqdm bars (iterations and the residual or objective); without it, nothing."""
import numpy as np

from influence import LogisticRegression


def test_fit_and_solves_show_their_bars(digits, capsys):
    X, y = digits
    m = LogisticRegression(weight_decay=0.01, progress=True).fit(X[:200], y[:200])
    err = capsys.readouterr().err
    assert "L-BFGS fit" in err and "objective" in err
    m.s_test(X[300], y[300], solver="cg")
    err = capsys.readouterr().err
    assert "CG" in err and "residual" in err
    m.influence_matrix(X[300:304], y[300:304], solver="cg")
    assert "block CG" in capsys.readouterr().err
    m.hessian_eigenvalue_bounds()
    assert "Lanczos" in capsys.readouterr().err
    quiet = LogisticRegression(weight_decay=0.01).fit(X[:200], y[:200])
    quiet.s_test(X[300], y[300], solver="cg")
    err = capsys.readouterr().err
    assert "L-BFGS fit" not in err and "residual" not in err
    assert np.isfinite(quiet.grad_norm_)


def test_progress_auto_follows_the_terminal_and_the_environment(digits, capsys, monkeypatch):
    import pytest

    from influence.utils import progress_on

    X, y = digits
    assert LogisticRegression().progress == "auto"  # the default, like Keras's verbose="auto"
    monkeypatch.delenv("INFLUENCE_PROGRESS", raising=False)
    assert progress_on("auto") is False  # pytest captures stderr: not a terminal
    monkeypatch.setenv("INFLUENCE_PROGRESS", "1")
    LogisticRegression(weight_decay=0.01).fit(X[:100], y[:100]).s_test(X[300], y[300], solver="cg")
    err = capsys.readouterr().err
    assert "L-BFGS fit" in err and "CG" in err
    monkeypatch.setenv("INFLUENCE_PROGRESS", "0")
    LogisticRegression(weight_decay=0.01).fit(X[:100], y[:100])
    assert "L-BFGS fit" not in capsys.readouterr().err
    assert progress_on(True) and not progress_on(False)
    with pytest.raises(ValueError, match="progress must be"):
        LogisticRegression(progress="yes")


def test_auto_damping_reuses_the_eigenvalue_search_just_made(digits, monkeypatch):
    """damping="auto" takes hessian_eigenvalue_bounds()'s cached Lanczos result: the solve
    after it costs CG's products only (one per iteration, plus the residual's)."""
    from influence.curvature import CurvatureOperator

    X, y = digits
    m = LogisticRegression(weight_decay=0.01).fit(X[:200], y[:200])
    m.hessian_eigenvalue_bounds()
    calls = []
    hvp = CurvatureOperator.hvp
    monkeypatch.setattr(CurvatureOperator, "hvp",
                        lambda self, u, indices=None: (calls.append(1), hvp(self, u, indices))[1])
    res = m.s_test(X[300], y[300], solver="cg", damping="auto", use_cache=False)
    assert res.info["damping_auto"] and len(calls) <= res.iterations + 2
