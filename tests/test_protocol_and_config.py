"""Frame parsing and settings validation, without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_service.config import Settings, load_settings
from llm_service.errors import (
    ConfigError,
    InvalidConfig,
    InvalidJSON,
    InvalidMessage,
    MessageTooLarge,
)
from llm_service.protocol import (
    Cancel,
    EndSession,
    StartSession,
    UserMessage,
    parse_client_frame,
)


def test_frames_parse_to_their_types() -> None:
    assert parse_client_frame('{"type":"user_message","text":"hi"}', 1024) == UserMessage("hi")
    assert parse_client_frame('{"type":"cancel"}', 1024) == Cancel()
    assert parse_client_frame('{"type":"end_session","x":1}', 1024) == EndSession()
    frame = parse_client_frame('{"type":"start_session","config":{"temperature":1}}', 1024)
    assert isinstance(frame, StartSession) and frame.config.temperature == 1.0
    frame = parse_client_frame('{"type":"start_session"}', 1024)
    assert isinstance(frame, StartSession) and frame.config.temperature is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{", InvalidJSON),
        ("[" * 5000, InvalidJSON),
        ("1e999", InvalidJSON),
        ("{}", InvalidMessage),
        ('{"type": null}', InvalidMessage),
        ('{"type": "user_message", "text": null}', InvalidMessage),
        ('{"type": "start_session", "config": []}', InvalidConfig),
        ('{"type": "start_session", "config": {"seed": 1e40}}', InvalidConfig),
        ('{"type": "start_session", "config": {"stop": ["a", 1]}}', InvalidConfig),
    ],
)
def test_bad_frames_raise_their_error(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_client_frame(text, 1 << 20)


def test_size_limit_counts_bytes() -> None:
    with pytest.raises(MessageTooLarge):
        parse_client_frame('{"type":"user_message","text":"' + "€" * 400 + '"}', 1024)
    assert parse_client_frame('{"type":"user_message","text":"' + "e" * 900 + '"}', 1024)


def test_settings_defaults_follow_the_seed() -> None:
    s = load_settings(_env_file=None)
    assert (s.llm_port, s.llm_monitoring_port, s.llm_max_connections) == (8000, 9092, 50)
    assert (s.llm_model, s.ollama_keep_alive) == ("llama3.2:1b", "5m")
    sampling = s.default_sampling()
    assert (sampling.temperature, sampling.max_tokens, s.default_context_window) == (
        0.7,
        2048,
        8192,
    )
    # the embedded engine's own default, where DEFAULT_TEMPERATURE is unset; set, it wins
    assert s.default_sampling({"temperature": 0.3}).temperature == 0.3
    assert (
        load_settings(_env_file=None, default_temperature=0.9)
        .default_sampling({"temperature": 0.3})
        .temperature
        == 0.9
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"llm_port": 70000}, "LLM_PORT"),
        ({"default_temperature": 2.5}, "DEFAULT_TEMPERATURE"),
        ({"ollama_base_url": "localhost:11434"}, "OLLAMA_BASE_URL"),
        ({"ollama_keep_alive": "forever"}, "OLLAMA_KEEP_ALIVE"),
        ({"compute_device": "tpu"}, "COMPUTE_DEVICE"),
        ({"default_max_tokens": 9000}, "DEFAULT_MAX_TOKENS"),
    ],
)
def test_bad_settings_name_the_variable(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(_env_file=None, **overrides)


def test_keep_alive_accepts_ollama_durations() -> None:
    for value in ("5m", "1h30m", "-1", "0", "300", "2.5h"):
        assert load_settings(_env_file=None, ollama_keep_alive=value).ollama_keep_alive == value


def test_env_example_lists_every_setting_with_a_comment() -> None:

    lines = (Path(__file__).parent.parent / ".env.example").read_text().splitlines()
    listed = {}
    for i, line in enumerate(lines):
        if line and not line.startswith("#") and "=" in line:
            name = line.split("=", 1)[0]
            assert lines[i - 1].startswith("# "), f"{name} has no comment above it"
            listed[name] = line.split("=", 1)[1]
    assert set(listed) == {name.upper() for name in Settings.model_fields}


def test_env_example_is_copy_safe_every_value_is_the_default() -> None:
    # `cp .env.example .env` changes nothing: the file, read as a .env, gives the defaults
    example = Path(__file__).parent.parent / ".env.example"
    assert load_settings(_env_file=example) == load_settings(_env_file=None)
    assert load_settings(_env_file=example).llm_backend == "auto"


def test_host_is_loopback_unless_a_key_guards_the_port() -> None:
    assert load_settings(_env_file=None).llm_host == "127.0.0.1"
    assert load_settings(_env_file=None, llm_api_key="k-1").llm_host == "0.0.0.0"
    assert load_settings(_env_file=None, llm_api_key=" ").llm_host == "127.0.0.1"
    explicit = load_settings(_env_file=None, llm_host="0.0.0.0")
    assert explicit.llm_host == "0.0.0.0" and explicit.llm_api_key is None


def test_default_and_session_sampling_share_their_ranges() -> None:
    # top_k 0 means "no top-k" to every engine: allowed as a default as in a session
    assert load_settings(_env_file=None, default_top_k=0).default_sampling().top_k == 0
    with pytest.raises(InvalidConfig):
        parse_client_frame('{"type":"start_session","config":{"top_p":0}}', 1024)
    with pytest.raises(ConfigError, match="DEFAULT_TOP_P"):
        load_settings(_env_file=None, default_top_p=0)
    for value in (-0.1, 2.1):
        with pytest.raises(ConfigError, match="DEFAULT_TEMPERATURE"):
            load_settings(_env_file=None, default_temperature=value)
        with pytest.raises(InvalidConfig, match="temperature"):
            parse_client_frame(
                f'{{"type":"start_session","config":{{"temperature":{value}}}}}', 1024
            )
