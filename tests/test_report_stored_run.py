"""An experiment run stored as it was written (``tests/data/smoke_run``): a smoke experiment's
run folder without its checkpoints and TensorBoard logs, its figures emptied (the report only
copies them), with the ``report.md`` that ``plankton report`` wrote of it then. The report of it
today must read the same, so that a change to the runner or the report cannot silently change
what an earlier run reports."""

import shutil

from conftest import REPOSITORY

from cli import main

STORED_RUN = REPOSITORY / "tests" / "data" / "smoke_run"


def test_a_stored_run_is_reported_as_it_was(tmp_path, capsys):
    run_dir = tmp_path / "smoke_run"
    shutil.copytree(STORED_RUN, run_dir)
    expected = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    # The one line that depends on where the folder lies (``tensorboard --logdir``) names it
    # RUN_DIR in the stored report.
    assert report.replace(str(run_dir), "RUN_DIR").splitlines() == expected.splitlines()
