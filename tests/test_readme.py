"""README's commands, its "sparsify your own Flax model" example and its loops are real."""

import re

import numpy as np


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _bash_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip()]


def _run(code: str) -> dict:
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    return ns


def test_own_model_example_runs_and_learns(root):
    code = _python_blocks((root / "README.md").read_text())[0]
    assert len([l for l in code.strip().splitlines() if l.strip()]) <= 18
    ns = _run(code)
    final = float(ns["loss"](ns["params"], ns["state"]))
    zero = float(np.mean(np.asarray(ns["y"]) ** 2))  # loss of predicting 0
    assert final < 0.25 * zero
    import sparsejax

    counts = sparsejax.mask_counts(ns["state"].masks)
    # ERK closed form: p = (16+256)/(16·256) and (256+1)/256; ε·Σ p·N = 0.1·(4096+256)
    eps = round(0.1 * 4352) / (272 + 257)
    assert counts == {"layers/0/kernel": (round(eps * 272), 4096),
                      "layers/2/kernel": (round(eps * 257), 256)}
    w = np.asarray(ns["params"]["layers"][0]["kernel"])
    assert np.count_nonzero(w) <= counts["layers/0/kernel"][0]  # stored weights are sparse


def test_nnx_loop_diff_is_three_lines_and_the_loop_trains_sparse(root):
    text = (root / "README.md").read_text()
    (diff,) = re.findall(r"```diff\n(.*?)```", text, flags=re.S)
    minus = [l[1:] for l in diff.splitlines() if l.startswith("-")]
    plus = [l[1:] for l in diff.splitlines() if l.startswith("+")]
    assert len(minus) == len(plus) <= 3
    code = _python_blocks(text)[1]
    lines = code.splitlines()
    for line in plus:  # the loop shown is the diff applied
        assert line in lines, line
    # Reversed, the diff gives a loop with no sparsejax in it: the Flax tutorial's.
    dense = code
    for old, new in zip(minus, plus):
        dense = dense.replace(new, old)
    assert "sparsejax." not in dense
    ns = _run(code)
    import sparsejax
    from flax import nnx

    result = {k: float(v) for k, v in ns["metrics"].compute().items()}
    assert result["accuracy"] > 0.85, result
    seen = sparsejax.sparse_model(ns["model"], ns["optimizer"])
    params = nnx.to_pure_dict(nnx.state(seen, nnx.Param))
    sparse = [np.asarray(params[k]["kernel"]) for k in ("conv2", "linear1")]
    density = sum(np.count_nonzero(w) for w in sparse) / sum(w.size for w in sparse)
    assert density <= 0.1 + 1e-9  # 90% sparse (new connections may still be exactly 0)
    for k in ("conv1", "linear2"):  # default_rules keeps stem and head dense
        assert np.count_nonzero(np.asarray(params[k]["kernel"])) == params[k]["kernel"].size


def test_ci_runs_the_readme_test_command(root):
    lines = _bash_lines((root / "README.md").read_text())
    test_cmd = next(line for line in lines if "pytest" in line)
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci
    install = next(line for line in lines if "pip install" in line)
    assert install in ci
    assert any("experiments.train --config configs/quickstart.py" in line for line in lines)


def test_every_readme_command_names_real_modules_configs_and_keys(root):
    """Each ``python3 -m`` line of README's bash blocks: the module exists; for the
    launcher, the config file builds with its argument and every ``--config.x.y=v``
    override names a key the config has (the short runs themselves are CI's smoke run and
    the notebook and kernel tests)."""
    import importlib
    import importlib.util
    import shlex

    lines = [l for l in _bash_lines((root / "README.md").read_text()) if "python3 -m " in l]
    assert len(lines) >= 10
    for line in lines:
        argv = shlex.split(line.split("#")[0].replace("$HOME", "/home"))
        module = argv[argv.index("-m") + 1]
        if module in ("pip", "pytest"):
            continue
        assert importlib.util.find_spec(module) is not None, line
        if module != "experiments.train":
            continue
        path, _, arg = argv[argv.index("--config") + 1].partition(":")
        config = importlib.import_module(path[:-3].replace("/", ".")).get_config(arg or None)
        for flag in (a for a in argv if a.startswith("--config.")):
            key, _, value = flag[len("--config."):].partition("=")
            *parents, leaf = key.split(".")
            section = config
            for p in parents:
                section = section[p]
            assert leaf in section, f"{line}: config has no key {key!r}"


def test_two_step_dispatch_example_equals_the_single_step_loop(root):
    """The README's dispatch loop, from the first example's fresh state, gives the
    single-program loop's masks (and params to rounding) with two compiled steps."""
    import jax

    blocks = _python_blocks((root / "README.md").read_text())
    (dispatch,) = [b for b in blocks if "mask_update_due" in b]
    fresh = blocks[0].replace("for _ in range(400):", "for _ in range(0):")
    assert fresh != blocks[0]
    ns = _run(fresh)
    ref_params, ref_state = ns["params"], ns["state"]
    for _ in range(400):
        ref_params, ref_state = ns["step"](ref_params, ref_state)
    exec(compile(dispatch, "README.md", "exec"), ns)
    assert ns["step"]._cache_size() == 2 and int(ns["state"].count) == 400
    for a, b in zip(jax.tree.leaves(ns["state"].masks), jax.tree.leaves(ref_state.masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(ns["params"]), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
