"""The README's example runs as written, and its first two commands are the set-up commands."""

import re
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_starts_with_the_two_setup_commands():
    commands = re.findall(r"^python3 -m pip install .*$", README, flags=re.M)
    assert commands[0] == "python3 -m pip install -e . && python3 -m jaxdiff demo"
    assert commands[1] == 'python3 -m pip install -e ".[test]" && python3 -m pytest'
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_readme_example_runs(capsys):
    block = re.search(r"## Ten lines\n\n```python\n(.*?)```", README, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    sol, data = namespace["sol"], namespace["data"]
    assert sol.x.shape == (4096, 2) and int(sol.nfe) == 21
    import jax

    import jaxdiff as jd

    ed = float(jd.energy_distance(sol.x, data.sample(jax.random.key(1), 4096)))
    assert ed < 0.01  # null std at n = 4096 is ~1.3e-3; the 100-step EM bias is smaller
