"""README's commands and its "use your own Flax model" example are real."""

import re

import numpy as np


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _bash_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip()]


def test_own_model_example_runs_and_learns(root):
    (code,) = _python_blocks((root / "README.md").read_text())
    assert len([l for l in code.strip().splitlines() if l.strip()]) <= 18
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
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


def test_ci_runs_the_readme_test_command(root):
    lines = _bash_lines((root / "README.md").read_text())
    test_cmd = next(line for line in lines if "pytest" in line)
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci
    install = next(line for line in lines if "pip install" in line)
    assert install in ci
    assert any("experiments.train --config configs/quickstart.py" in line for line in lines)
