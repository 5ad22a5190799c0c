"""The CLI as a person meets it: every subcommand's `--help` has a description and examples (that parse),
`--version` is the installed package's, `--log-level` decides which of samsr's log lines reach stderr
(other libraries stay at WARNING) and a bad level is refused by name; progress bars in the plain loop."""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from pipelines import cli, cli_help

SUBCOMMANDS = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
COMMANDS = sorted(SUBCOMMANDS)


def test_every_subcommand_has_help_texts():
    assert COMMANDS == sorted(cli_help.COMMANDS)
    top = " ".join(cli.build_parser().format_help().split())
    for name in COMMANDS:
        assert " ".join(cli_help.COMMANDS[name][0].split()) in top, name
    assert "examples:" in top and "samsr local up" in top


def example_argvs(examples: str) -> list[list[str]]:
    """The `samsr …` example lines as argv (continuations joined, comments and redirections dropped)."""
    argvs = []
    for line in examples.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        argv = argv[:next((i for i, a in enumerate(argv) if a in (">", "|", "&&")), len(argv))]
        if argv and argv[0] == "samsr":
            argvs.append(argv[1:])
    return argvs


@pytest.mark.parametrize("name", COMMANDS)
def test_subcommand_help_shows_a_description_and_examples_that_parse(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    summary, description, examples = cli_help.COMMANDS[name]
    assert text.startswith(f"usage: samsr {name}")
    assert len(description) > 100 and all(line in text for line in description.splitlines())
    assert "\nexamples:\n" in text and all(f"  {line}" in text for line in examples.splitlines())
    ours = [argv for argv in example_argvs(examples) if argv[0] == name]
    assert ours, examples
    for argv in ours:                          # each example is a valid invocation of this subcommand
        assert cli.build_parser().parse_args(argv).command == name, argv


@pytest.mark.parametrize("job", ["shard", "train", "upscale", "eval"])
def test_entrypoint_help_shows_an_example_and_log_level(job):
    text = importlib.import_module(f"pipelines.{job}").parser().format_help()
    assert f"ray job submit -- python -m pipelines.{job} --config samdiffsr-tiny --set" in text
    assert "--log-level LEVEL" in text


def test_version_is_the_installed_packages():
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"samsr {metadata.version('samsr')}"
    assert metadata.version("samsr").count(".") >= 2


PROBE = """
import logging, sys
{setup}
for name in ("samsr.storage", "pipelines.train", "botocore"):
    logger = logging.getLogger(name)
    logger.debug("probe-debug %s", name)
    logger.info("probe-info %s", name)
    logger.warning("probe-warning %s", name)
"""
CLI = "from pipelines import cli\ncli.main(sys.argv[1:])"
ENTRYPOINT = ("from pipelines import rayenv\nrayenv.entrypoint_parser('pipelines.x', 'd', 'a=b').parse_args(sys.argv[1:])\n"
              "rayenv.run_entrypoint('pipelines.x', lambda: 0)")


def logged(args: list[str], env: dict | None = None, setup: str = CLI) -> str:
    """stderr of a process that runs `args` through the samsr CLI (or parses them as a job entrypoint and
    runs it) and then logs from a library logger, a job's logger and a third-party one at three levels."""
    base = {k: v for k, v in os.environ.items() if k != "SAMSR_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup), *args], capture_output=True, text=True,
                          timeout=60, env={**base, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def shown(stderr: str) -> set[str]:
    return {" ".join(line.split()[-2:]) for line in stderr.splitlines() if "probe-" in line}


def test_log_level_decides_what_reaches_stderr():
    own = {"samsr.storage", "pipelines.train"}
    debug = logged(["--log-level", "DEBUG", "presets"])
    assert shown(debug) == {f"probe-{lvl} {n}" for lvl in ("debug", "info", "warning") for n in own} | {
        "probe-warning botocore"}                        # third-party stays at WARNING
    assert " DEBUG samsr.storage: probe-debug samsr.storage" in debug          # the basicConfig format
    warning = shown(logged(["--log-level", "WARNING", "presets"]))
    assert warning == {"probe-warning samsr.storage", "probe-warning pipelines.train", "probe-warning botocore"}
    default = shown(logged(["presets"]))                # INFO: the jobs' progress lines, no debug
    assert "probe-info samsr.storage" in default and "probe-debug samsr.storage" not in default
    # after the subcommand too, in any case; the others' warnings still show
    assert shown(logged(["presets", "--log-level", "error"])) == {"probe-warning botocore"}
    assert "probe-debug pipelines.train" in shown(logged(["presets"], env={"SAMSR_LOG_LEVEL": "DEBUG"}))
    entry = shown(logged(["--log-level", "DEBUG"], setup=ENTRYPOINT))          # python -m pipelines.<job>
    assert "probe-debug samsr.storage" in entry and "probe-debug botocore" not in entry
    assert "probe-info samsr.storage" in shown(logged([], setup=ENTRYPOINT))


def test_a_bad_log_level_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--log-level", "LOUD", "presets"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --log-level: 'LOUD' is not a log level; choose one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in err
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "presets"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SAMSR_LOG_LEVEL": "chatty"})
    assert proc.returncode == 2 and "$SAMSR_LOG_LEVEL: 'chatty' is not a log level" in proc.stderr


def test_plain_loop_shows_a_progress_bar_only_when_asked(capsys):
    import torch

    from samsr import config, images
    from samsr.data import Sample
    from samsr.diffusion.samdiffsr import SamDiffSR
    from samsr.loop import pretrain_rrdb

    hr = images.crop_to_multiple(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8), 4)
    sample = Sample("x", hr, images.make_lr(hr, 4), np.zeros(hr.shape[:2], np.uint16), np.zeros(1, np.float32),
                    np.ones(hr.shape[:2], np.uint8), 1.0, 1.0)
    cfg = config.load("samdiffsr-tiny", ["train.batch_size=2", "train.log_every=2"])
    logged_steps: list[int] = []
    torch.manual_seed(0)
    rrdb = SamDiffSR.from_config(cfg).rrdb
    history = pretrain_rrdb(rrdb, [sample], cfg, 0, iterations=3, log=lambda s, m: logged_steps.append(s),
                            progress=True)
    bar = capsys.readouterr().err
    assert len(history) == 3 and logged_steps == [2, 3]
    assert "rrdb" in bar and "3/3" in bar and "rrdb_l1=" in bar
    pretrain_rrdb(rrdb, [sample], cfg, 0, iterations=2, progress=False)
    pretrain_rrdb(rrdb, [sample], cfg, 0, iterations=2, progress=None)   # auto: stderr is not a terminal here
    assert capsys.readouterr().err == ""


def test_progress_is_ray_datas_bars_in_a_terminal_and_interval_lines_otherwise(caplog):
    import io
    import logging

    from ray.data import DataContext

    from pipelines.rayenv import RowProgress, data_progress_bars

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    before = DataContext.get_current().enable_progress_bars
    try:
        assert data_progress_bars(Terminal()) is True and DataContext.get_current().enable_progress_bars
        assert data_progress_bars(io.StringIO()) is False and not DataContext.get_current().enable_progress_bars
    finally:
        DataContext.get_current().enable_progress_bars = before
    log = logging.getLogger("pipelines.upscale")
    with caplog.at_level(logging.INFO, logger="pipelines.upscale"):
        every = RowProgress(log, "samsr upscale", 3, every_s=0.0)
        for failed in (False, True, False):
            every.add(failed)
        hourly = RowProgress(log, "samsr eval", 3, every_s=3600.0)     # only the last row's line
        for _ in range(3):
            hourly.add()
        quiet = RowProgress(log, "samsr eval", 1, every_s=0.0, quiet=True)  # Ray Data's bars show instead
        quiet.add()
    lines = [r.getMessage().rsplit(",", 1)[0] for r in caplog.records]
    assert lines == ["samsr upscale: 1/3 images, 0 failed", "samsr upscale: 2/3 images, 1 failed",
                     "samsr upscale: 3/3 images, 1 failed", "samsr eval: 3/3 images, 0 failed"]
