"""The tensor calculator (course/tensor_calc.py, Mini-Project 1): results against NumPy and
torch computed here independently, errors that name the shapes, autograd against known
derivatives, refused Python, exit codes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from course.tensor_calc import BAD_INPUT, CHECK_FAILED, OK, main
from tests.conftest import REPO


def calc(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    """Exit status, the JSON result (``--json``) or {}, and stderr."""
    status = main([*argv, "--json"])
    out, err = capsys.readouterr()
    return status, (json.loads(out) if out.strip() else {}), err


def test_matmul_reshape_and_arithmetic_equal_numpy(capsys):
    a, b = np.array([[1, 2], [3, 4]]), np.array([[5], [6]])
    status, out, _ = calc(capsys, "a @ b", "--a", "[[1,2],[3,4]]", "--b", "[[5],[6]]")
    assert status == OK and out["shape"] == [2, 1]
    np.testing.assert_array_equal(out["value"], a @ b)

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 1))
    expression = "exp(x) * 2 - x @ y / 3 + softmax(x, dim=1)"
    status, out, _ = calc(
        capsys, "eval", expression, "--x", json.dumps(x.tolist()), "--y", json.dumps(y.tolist())
    )
    softmax = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    expected = np.exp(x) * 2 - (x @ y) / 3 + softmax  # (2, 3, 1) broadcasts over 4
    assert status == OK and out["shape"] == [2, 3, 4]
    np.testing.assert_allclose(out["value"], expected, rtol=1e-12)

    status, out, _ = calc(capsys, "reshape", "[1,2,3,4,5,6]", "--shape", "3,-1")
    assert status == OK
    np.testing.assert_array_equal(out["value"], np.arange(1, 7).reshape(3, -1))


def test_broadcast_shows_the_shape_and_expanded_tensors(capsys):
    status, out, _ = calc(capsys, "broadcast", "[1,2,3]", "[[10],[20]]")
    assert status == OK and out["shape"] == [2, 3]
    left, right = np.broadcast_arrays(np.array([1, 2, 3]), np.array([[10], [20]]))
    np.testing.assert_array_equal(out["expanded"][0]["value"], left)
    np.testing.assert_array_equal(out["expanded"][1]["value"], right)


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["a + b", "--a", "[[1,2,3],[4,5,6]]", "--b", "[1,2]"], ["(2, 3)", "(2,)", "3 and 2"]),
        (["broadcast", "[[1,2,3]]", "[[1],[2]]", "[1,2]"], ["(2, 3)", "(2,)"]),
        (["a @ b", "--a", "[[1,2],[3,4]]", "--b", "[[5,6]]"], ["(2, 2)", "(1, 2)", "(2)"]),
        (["reshape", "[1,2,3,4,5,6]", "--shape", "4,2"], ["(6,)", "(4, 2)", "8 elements"]),
        (["a", "--a", "[[1,2],[3]]"], ["ragged"]),
        (["a * c", "--a", "1"], ["unknown name 'c'", "--c"]),
        (["9 ** 9 ** 9"], ["overflows"]),
    ],
)
def test_bad_input_says_which_shapes_and_what_rule(capsys, argv, names):
    status, out, err = calc(capsys, *argv)
    assert status == BAD_INPUT and out == {}
    for name in names:
        assert name in err, err
    if "broadcast" in err:
        assert "equal or one of them 1" in err


@pytest.mark.parametrize(
    ("expression", "at", "derivative"),
    [
        ("x**2 + 3*x", 2.0, lambda x: 2 * x + 3),
        ("sin(x) * exp(x)", 0.7, lambda x: math.cos(x) * math.exp(x) + math.sin(x) * math.exp(x)),
        ("log(sigmoid(x))", -1.5, lambda x: 1 - 1 / (1 + math.exp(-x))),
        ("sqrt(x) / x", 4.0, lambda x: -0.5 * x**-1.5),
    ],
)
def test_gradients_of_known_functions(capsys, expression, at, derivative):
    status, out, _ = calc(capsys, "grad", expression, "--at", str(at), "--check")
    assert status == OK and out["check_passed"]
    assert out["grad"]["value"] == pytest.approx(derivative(at), rel=1e-12)
    assert out["finite_difference"]["value"] == pytest.approx(derivative(at), rel=1e-6)


def test_gradient_of_a_vector_and_its_finite_difference_check(capsys):
    status, out, _ = calc(
        capsys, "grad", "sum(w * x**3)", "--at", "[1.0, -2.0]", "--w", "[2.0, 0.5]", "--check"
    )
    assert status == OK
    np.testing.assert_allclose(out["grad"]["value"], [2.0 * 3 * 1.0, 0.5 * 3 * 4.0])
    # A kink sits between the finite difference's two points: autograd's one-sided answer
    # (relu'(0) = 0) and the central difference (0.5) disagree, and the check says so.
    status, out, _ = calc(capsys, "grad", "relu(x)", "--at", "0.0", "--check")
    assert status == CHECK_FAILED and not out["check_passed"]
    status, _, err = calc(capsys, "grad", "x * 2", "--at", "[1.0, 2.0]")
    assert status == BAD_INPUT and "sum(" in err


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('touch pwned')",
        "__import__('os')",
        "a.__class__",
        "a[0]",
        "(lambda: 1)()",
        "[c for c in 'ab']",
        "open('x')",
        "'text'",
    ],
)
def test_python_beyond_arithmetic_is_refused_not_run(capsys, tmp_path, monkeypatch, expression):
    monkeypatch.chdir(tmp_path)
    status, _, err = calc(capsys, expression, "--a", "[1, 2]")
    assert status == BAD_INPUT
    assert "not allowed" in err or "only numbers are constants" in err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_command_line_exit_codes():
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "course.tensor_calc", *argv],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = run("a @ b", "--a", "[[1,2],[3,4]]", "--b", "[[5],[6]]")
    assert ok.returncode == 0 and "[[17]" in ok.stdout and "[39]]" in ok.stdout
    bad = run("a + b", "--a", "[1,2,3]", "--b", "[1,2]")
    assert bad.returncode == 2 and "(3,)" in bad.stderr and "(2,)" in bad.stderr
    assert bad.stdout == ""
    assert run("grad", "x**2").returncode == 2  # argparse: --at is required
