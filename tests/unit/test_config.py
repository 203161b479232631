"""A wrong config names the file, the key and the fix; the CLI exits 2 with no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_config
from core.errors import ConfigError

THREADBRIDGE = str(Path(sys.executable).parent / "threadbridge")
ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tb.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_embedded_default_loads() -> None:
    config = load_config(ROOT / "config/threadbridge.toml")
    assert config.default_agent == "demo"
    assert config.agent_configs["demo"].service == "local"
    assert config.web == {"enabled": True}


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (
            'default_agent = "demo"\n[agents.demo]\nservice = "lokal"\n',
            "agents.demo.service",
            "unknown service 'lokal'",
        ),
        ('default_agent = "demo"\n[agents.demo]\n', "agents.demo.service", "missing"),
        (
            'default_agent = "nope"\n[agents.demo]\nservice = "local"\n',
            "default_agent",
            "not defined",
        ),
        (
            '[agents.demo]\nservice = "local"\n[[routes]]\nsource = "slack"\nagent = "ghost"\n',
            "routes[0].agent",
            "unknown agent 'ghost'",
        ),
        (
            '[agents.demo]\nservice = "local"\n[[routes]]\nsource = "irc"\nagent = "demo"\n',
            "routes[0].source",
            "Input should be",
        ),
        ('[agents.demo]\nservice = "local"\n[server]\nprot = 1\n', "server.prot", "Extra inputs"),
        ('[agents.demo]\nservice = "local"\n[server]\nport = "x"\n', "server.port", "integer"),
        ('[agents.demo]\nservice = "local"\ncolour = 3\n', "agents.demo.colour", "Extra inputs"),
        (
            '[agents.e]\nservice = "engage-conversations"\nagent = "a"\n'
            'api_key_env = "TB_TEST_UNSET_KEY"\norg_id_env = "TB_TEST_UNSET_ORG"\n'
            '[agents.demo]\nservice = "local"\n',
            "agents.e.api_key_env",
            "TB_TEST_UNSET_KEY is not set",
        ),
        ("default_agent = \n", "(syntax)", "not valid TOML"),
    ],
)
def test_config_errors_name_file_key_and_problem(
    tmp_path: Path, text: str, key: str, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.file == str(path)
    assert caught.value.key == key
    assert words in str(caught.value)


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="THREADBRIDGE_CONFIG"):
        load_config(tmp_path / "absent.toml")


def test_config_check_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    path = write(tmp_path, '[agents.demo]\nservice = "lokal"\n')
    result = subprocess.run(
        [THREADBRIDGE, "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"{path}: agents.demo.service: unknown service 'lokal'" in result.stderr
    assert "fix: use one of:" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, 'default_agent = "ghost"\n[agents.demo]\nservice = "local"\n')
    result = subprocess.run(
        [THREADBRIDGE, "serve", "--config", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "default_agent" in result.stderr
    assert "Traceback" not in result.stderr


def test_secret_values_never_appear_in_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TB_TEST_KEY", "sk-very-secret-value")
    path = write(
        tmp_path,
        '[agents.demo]\nservice = "engage-conversations"\napi_key_env = "TB_TEST_KEY"\n'
        'org_id_env = "TB_TEST_KEY"\n',  # agent key missing
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "sk-very-secret-value" not in str(caught.value)
    assert caught.value.key == "agents.demo.agent"
