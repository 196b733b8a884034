"""Fault injection on config files (fit, experiment, data): each mistake is refused, before any
work, with exit status 2 and one line naming the file, and the line where YAML has one."""

import pytest
from conftest import REPOSITORY

from cli import main
from workflows.config_files import ConfigFileError, load_mapping, load_yaml

CONFIGS = REPOSITORY / "configs"
# configs/supervised.yaml with its trainer and data configs named by absolute path.
FIT = f"""trainer: {CONFIGS / "trainer" / "default.yaml"}
data: {CONFIGS / "data" / "synthetic.yaml"}
model:
  class_path: lightning_modules.SupervisedModule
  init_args:
    backbone: resnet10t
    lr: 0.01
"""


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def fit(config, capsys) -> str:
    """``plankton fit --config config`` (parsing only: it is refused), and its error line."""
    assert main(["fit", "--config", str(config), "--print_config"]) == 2
    return one_error_line(capsys)


def test_a_tab_in_an_experiment_config_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "experiment.yaml"
    config.write_text("name: tabbed\n\tdata: ../data/synthetic.yaml\n")
    assert main(["experiment", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert f"{config}, line 2: found a tab character; indent with spaces" in line
    assert not (tmp_path / "out").exists()


def test_a_tab_in_a_fit_config_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "fit.yaml"
    config.write_text(FIT.replace("    lr: 0.01", "\tlr: 0.01"))
    assert f"{config}, line 7: found a tab character; indent with spaces" in fit(config, capsys)


@pytest.mark.parametrize("command", ["fit", "experiment"])
def test_a_key_given_twice_is_refused_not_the_last_kept(tmp_path, capsys, command):
    config = tmp_path / "twice.yaml"
    if command == "fit":
        config.write_text(FIT + "    lr: 0.1\n")
        line = fit(config, capsys)
        assert f"{config}, line 8: key 'lr' is given twice (first on line 7)" in line
    else:
        config.write_text("name: a\nsamples: 4\nname: b\n")
        assert main(["experiment", "--config", str(config)]) == 2
        line = one_error_line(capsys)
        assert f"{config}, line 3: key 'name' is given twice (first on line 1)" in line


def test_an_unknown_key_in_a_fit_config_gets_the_closest_one(tmp_path, capsys):
    config = tmp_path / "fit.yaml"
    config.write_text(FIT.replace("    lr: 0.01", "    lrr: 0.01"))
    line = fit(config, capsys)
    assert line == f"error: {config}: model.init_args: unknown key 'lrr'; did you mean 'lr'?"


def test_an_unknown_key_in_a_config_a_fit_config_names_is_found_in_that_file(tmp_path, capsys):
    trainer = tmp_path / "trainer.yaml"
    trainer.write_text((CONFIGS / "trainer" / "default.yaml").read_text() + "max_epoch: 3\n")
    config = tmp_path / "fit.yaml"
    config.write_text(FIT.replace(str(CONFIGS / "trainer" / "default.yaml"), "trainer.yaml"))
    line = fit(config, capsys)
    assert line == f"error: {trainer}: trainer: unknown key 'max_epoch'; did you mean 'max_epochs'?"


def test_an_unknown_top_level_key_in_a_fit_config_gets_the_closest_one(tmp_path, capsys):
    config = tmp_path / "fit.yaml"
    config.write_text(FIT + "seed_everythin: 3\n")
    line = fit(config, capsys)
    assert line == f"error: {config}: unknown key 'seed_everythin'; did you mean 'seed_everything'?"


def test_an_empty_fit_config_is_refused_naming_it(tmp_path, capsys):
    config = tmp_path / "empty.yaml"
    config.write_text("# nothing yet\n")
    assert (
        fit(config, capsys) == f"error: {config}: expected a mapping of settings; the file is empty"
    )


def test_what_yaml_allows_but_a_user_never_means_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("classes:\n  1: one\n")
    with pytest.raises(
        ConfigFileError, match=r"c\.yaml, line 2: key '1' is not a string; quote it"
    ):
        load_yaml(config)
    config.write_text("")
    with pytest.raises(ConfigFileError, match=r"c\.yaml: expected a mapping of settings; the file"):
        load_mapping(config)
    config.write_text("a: [1, 2\n")
    with pytest.raises(ConfigFileError, match=r"c\.yaml, line 2: "):
        load_yaml(config)


def test_what_yaml_means_plainly_reads_as_before(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("base: &base {lr: 0.1}\nrun:\n  <<: *base\n  epochs: 2\nnote: 'a\tb'\n")
    assert load_yaml(config) == {
        "base": {"lr": 0.1}, "run": {"lr": 0.1, "epochs": 2}, "note": "a\tb"
    }  # fmt: skip
