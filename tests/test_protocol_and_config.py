"""Frame parsing and settings validation, without a server."""

from __future__ import annotations

import pytest

from llm_service.config import load_settings
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
    assert (s.default_temperature, s.default_max_tokens, s.default_context_window) == (
        0.7,
        2048,
        8192,
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
    from pathlib import Path

    from llm_service.config import Settings

    lines = (Path(__file__).parent.parent / ".env.example").read_text().splitlines()
    listed = {}
    for i, line in enumerate(lines):
        if line and not line.startswith("#") and "=" in line:
            name = line.split("=", 1)[0]
            assert lines[i - 1].startswith("# "), f"{name} has no comment above it"
            listed[name] = line.split("=", 1)[1]
    assert set(listed) == {name.upper() for name in Settings.model_fields}
    # the example's values are the defaults, but for the engine, which it names explicitly
    assert listed.pop("LLM_BACKEND") == "ollama"
    example = load_settings(_env_file=None, **{k.lower(): v for k, v in listed.items()})
    assert example == load_settings(_env_file=None, llm_backend="auto")
