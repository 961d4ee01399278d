"""The one configuration schema and ``outrider serve``'s resolution of it (no Ray, no servers).

Precedence: defaults < YAML file < OUTRIDER_* environment < flags; errors name the field and where
its value came from; the API key never shows; ``--print-config`` shows what would be served.
"""

import json

import pytest
import yaml

from cluster.cli import main
from cluster.config import NULL, ClusterConfig, ConfigError, ServeOptions, env_variables, load_config


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "my-model"
    path.mkdir()
    return str(path)


@pytest.fixture
def config_file(tmp_path, target):
    def write(data: dict) -> str:
        path = tmp_path / "cluster.yaml"
        path.write_text(yaml.safe_dump({"target": target, **data}))
        return str(path)

    return write


def test_serve_options_defaults_and_secret():
    opts = ServeOptions()
    assert (opts.host, opts.http_port, opts.grpc_port, opts.api_key) == ("127.0.0.1", 8000, 50051, None)
    keyed = ServeOptions(api_key="hunter2")
    assert "hunter2" not in repr(keyed) and "hunter2" not in keyed.model_dump_json()
    assert keyed.to_dict()["api_key"] == "hunter2" and keyed.api_key_value() == "hunter2"
    with pytest.raises(ValueError, match="api_key"):
        ServeOptions(api_key="  ")
    with pytest.raises(ValueError, match="http_port"):
        ServeOptions(http_port=70000)
    with pytest.raises(ValueError, match="extra"):
        ServeOptions(prot=1)
    assert ClusterConfig(target="x").serve == ServeOptions()


def test_precedence_defaults_file_env_flags(config_file, target):
    path = config_file({"draft": "self:2", "max_running": 8, "serve": {"http_port": 9001, "grpc_port": 50052,
                                                                       "model_name": "from-file"}})
    env = {"OUTRIDER_HTTP_PORT": "9002", "OUTRIDER_MAX_RUNNING": "16", "OUTRIDER_API_KEY": "env-key",
           "OUTRIDER_CACHE": "/elsewhere"}  # not a field: ignored
    config = load_config(path, env=env, flags={"max_running": 32, "num_draft_tokens": None,
                                               "serve": {"model_name": "from-flag"}},
                         defaults={"draft": "self:8", "num_draft_tokens": 2})
    assert config.target == target and config.draft == "self:2"  # file beats default
    assert config.num_draft_tokens == 2  # default kept (the None flag is "not given")
    assert config.max_running == 32  # flag beats env beats file
    assert config.serve.http_port == 9002 and config.serve.grpc_port == 50052  # env beats file
    assert config.serve.model_name == "from-flag" and config.serve.api_key_value() == "env-key"
    # none in the environment and NULL as a flag clear an optional field
    assert load_config(path, env={"OUTRIDER_GRPC_PORT": "none"}).serve.grpc_port is None
    assert load_config(path, env={}, flags={"serve": {"grpc_port": NULL}}).serve.grpc_port is None
    assert load_config(path, env={"OUTRIDER_GRPC_PORT": "none"}, flags={"serve": {"grpc_port": 7}}).serve.grpc_port == 7
    # every field has its variable, flat: OUTRIDER_<FIELD>
    assert env_variables()["OUTRIDER_DRAFT"] == ("draft",)
    assert env_variables()["OUTRIDER_API_KEY"] == ("serve", "api_key")


@pytest.mark.parametrize("where,kwargs,expected", [
    ("file", {"file": {"max_running": "many"}}, "max_running (from {file}): Input should be a valid integer"),
    ("file", {"file": {"serve": {"htp_port": 1}}}, "serve.htp_port (from {file}): unknown field"),
    ("file", {"file": {"bogus": 1}}, "bogus (from {file}): unknown field"),
    ("env", {"env": {"OUTRIDER_HTTP_PORT": "eighty"}}, "serve.http_port (from OUTRIDER_HTTP_PORT)"),
    ("env", {"env": {"OUTRIDER_NUM_DRAFT_TOKENS": "-1"}}, "num_draft_tokens (from OUTRIDER_NUM_DRAFT_TOKENS)"),
    ("flag", {"flags": {"serve": {"request_timeout_s": 0}}}, "serve.request_timeout_s (from command line)"),
    ("flag", {"flags": {"draft": "self:x"}}, "draft (from command line): draft 'self:x': expected self:N"),
])
def test_errors_name_the_field_and_source(config_file, where, kwargs, expected):
    path = config_file(kwargs.get("file", {}))
    with pytest.raises(ConfigError) as info:
        load_config(path, env=kwargs.get("env", {}), flags=kwargs.get("flags"))
    assert expected.format(file=path) in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.yaml", env={})
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml", env={})
    (tmp_path / "broken.yaml").write_text("target: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml", env={})


# ----------------------------------------------------------------- the CLI
def print_config(capsys, monkeypatch, argv, env=None):
    for name in env_variables():
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    code = main(["serve", *argv, "--print-config"])
    out, err = capsys.readouterr()
    return code, (yaml.safe_load(out) if code == 0 else None), err


def test_cli_print_config_precedence(capsys, monkeypatch, config_file, target):
    path = config_file({"draft": "self:2", "serve": {"http_port": 9001, "grpc_port": 50052}})
    code, data, _ = print_config(capsys, monkeypatch, ["--config", path, "--grpc-port", "none", "--api-key", "k1"],
                                 env={"OUTRIDER_HTTP_PORT": "9002", "OUTRIDER_GRPC_PORT": "50053"})
    assert code == 0
    assert data["target"] == target and data["draft"] == "self:2"
    assert data["serve"]["http_port"] == 9002 and data["serve"]["grpc_port"] is None
    assert data["serve"]["api_key"] == "**********"  # never printed
    code, data, _ = print_config(capsys, monkeypatch, ["--target", target, "--draft", "self:1", "--port", "8123",
                                                       "--no-overlap", "--max-waiting", "3"])
    assert data["draft"] == "self:1" and data["serve"]["http_port"] == 8123 and data["overlap"] is False
    assert data["max_waiting"] == 3 and data["serve"]["grpc_port"] == 50051


def test_cli_fake_gpus_without_cuda(capsys, monkeypatch, target):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, data, _ = print_config(capsys, monkeypatch, ["--target", target, "--draft", "self:1"])
    assert data["num_gpus"] == 2 and data["cpus_per_worker"] == 0
    _, data, _ = print_config(capsys, monkeypatch, ["--target", target])
    assert data["num_gpus"] == 1 and data["draft"] == "none"
    _, data, _ = print_config(capsys, monkeypatch, ["--target", target, "--draft", "self:1", "--colocate"])
    assert data["num_gpus"] == 1 and data["draft_gpus"] == 0
    assert data["overlap"] is False  # colocated: taking turns unless overlap is asked for
    _, data, _ = print_config(capsys, monkeypatch, ["--target", target, "--address", "auto"])
    assert data["num_gpus"] is None  # a cluster that is joined declares its own GPUs


def test_cli_colocates_on_too_few_gpus(capsys, monkeypatch, target):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _, data, err = print_config(capsys, monkeypatch, ["--target", target, "--draft", "self:1"])
    assert data["colocate"] is True and data["draft_gpus"] == 0 and "shares the target's GPU" in err
    assert data["overlap"] is False  # colocated by default: taking turns by default
    _, data, _ = print_config(capsys, monkeypatch, ["--target", target, "--draft", "self:1", "--draft-gpus", "1"])
    assert data["colocate"] is False  # placed explicitly: left alone (Ray refuses it if it cannot fit)


def test_cli_demo_model_by_default(capsys, monkeypatch, target):
    import cluster.demo_model

    monkeypatch.setattr(cluster.demo_model, "ensure_demo_model", lambda progress=False: target)
    _, data, _ = print_config(capsys, monkeypatch, [])
    assert data["target"] == target and data["draft"] == "self:8"
    assert data["serve"]["model_name"] == "SmolLM2-135M-Instruct"
    _, data, _ = print_config(capsys, monkeypatch, ["--draft", "none"])
    assert data["draft"] == "none"


@pytest.mark.parametrize("argv,message", [
    (["--target", "/no/such/model"], "target /no/such/model: no such file or directory"),
    (["--draft", "./no-such-draft"], "draft ./no-such-draft"),
    (["--num-draft-tokens", "-2"], "num_draft_tokens (from command line)"),
    (["--port", "0"], "serve.http_port (from command line)"),
    (["--config", "/no/such.yaml"], "--config /no/such.yaml"),
])
def test_cli_errors_exit_2(capsys, monkeypatch, target, argv, message):
    if "--target" not in argv:
        argv = ["--target", target, *argv]
    code, _, err = print_config(capsys, monkeypatch, argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.startswith("outrider serve: error: ")


def test_cli_bad_env_exits_2(capsys, monkeypatch, target):
    code, _, err = print_config(capsys, monkeypatch, ["--target", target], env={"OUTRIDER_MAX_RUNNING": "lots"})
    assert code == 2 and "max_running (from OUTRIDER_MAX_RUNNING)" in err


def test_cli_help_and_banner(capsys, target):
    assert main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    for words in ("--target", "--draft", "--api-key", "--grpc-port", "OUTRIDER_", "curl", "Ctrl-C"):
        assert words in text, words
    from cluster.cli import _serve_banner

    config = ClusterConfig(target=target, serve={"http_port": 8123, "api_key": "k3y", "grpc_port": None})
    banner = _serve_banner(config)
    assert "http://127.0.0.1:8123/v1" in banner and "Authorization: Bearer k3y" in banner
    assert "gRPC        off" in banner and '"model": "my-model"' in banner
    body = banner.split("-d '", 1)[1].split("'", 1)[0]
    assert json.loads(body)["stream"] is True


def test_overlap_defaults_to_the_placement():
    """Unset, overlap is on for a draft with GPUs of its own and off for a colocated one (two
    processes time-slice one GPU); an explicit value is kept either way."""
    from cluster.config import ClusterConfig

    assert ClusterConfig(target="x", draft="self:1").overlap is True
    assert ClusterConfig(target="x", draft="self:1", colocate=True, draft_gpus=0).overlap is False
    assert ClusterConfig(target="x", draft="self:1", colocate=True, draft_gpus=0, overlap=True).overlap is True
    assert ClusterConfig(target="x", draft="self:1", overlap=False).overlap is False
    assert ClusterConfig(target="x", draft="self:1", colocate=True, draft_gpus=0, overlap=None).overlap is False
