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


def test_sampler_tables_show_how_to_call_each_factory():
    """The README's and jaxdiff.samplers' tables write an argument as `name` where it may be
    given by position and as `name=` where it is keyword-only: each call shape, with the
    defaults filled in, builds its sampler. Nine rows had shown keyword-only arguments as
    positional (`dpm_solver_pp(2, 1.0)` raised TypeError)."""
    import inspect

    import jaxdiff as jd

    module_doc = jd.samplers.__doc__
    shapes = re.findall(r"^\| `(\w+)\(([^)]*)\)`", README, flags=re.M)
    shapes += re.findall(r"^``(\w+)\(([^)]*)\)``  ", module_doc, flags=re.M)  # table rows
    shapes += re.findall(r"`(dpm_solver_sde)\(([^)]*)\)`", README)  # the README's shared row
    assert len(shapes) >= 28
    for name, args in shapes:
        factory = getattr(jd.samplers, name)
        params = inspect.signature(factory).parameters
        positional, keywords = [], {}
        for arg in (a.strip() for a in args.split(",") if a.strip() not in ("", "...")):
            default = params[arg.rstrip("=")].default
            if arg.endswith("="):  # the legend: name= is keyword-only
                assert params[arg[:-1]].kind is inspect.Parameter.KEYWORD_ONLY, (name, arg)
                keywords[arg[:-1]] = default
            else:
                positional.append(default)
        assert isinstance(factory(*positional, **keywords), jd.samplers.Sampler), (name, args)


def test_every_public_name_is_in_the_readme():
    """Each name of ``jaxdiff.__all__`` and ``jaxdiff.samplers.__all__`` appears in the README
    as a word (16 public names had been reachable only through their docstrings)."""
    import jaxdiff as jd

    names = list(jd.__all__) + list(jd.samplers.__all__)
    missing = [n for n in names if not re.search(rf"\b{re.escape(n)}\b", README)]
    assert not missing, missing
