"""Entry point: `python main.py websocket | test | config --show`."""

from llm_service.cli import main

if __name__ == "__main__":
    main()
