"""Start the dashboard: ``routelens app --db STORE [--port N]`` calls :func:`main`.

Runs ``python -m streamlit run app/main.py`` bound to 127.0.0.1 (only this machine can connect) unless another
address is asked for, with the store path after Streamlit's ``--`` separator (read by ``app/state.py``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from routelens.errors import InputError

MAIN = Path(__file__).resolve().parent / "main.py"


def command(db: str | os.PathLike | None, port: int = 8501, *, headless: bool = True,
            address: str = "127.0.0.1") -> list[str]:
    """The ``streamlit run`` command line (a list, no shell: the path is passed as one argument)."""
    if not 0 < int(port) < 65536:
        raise InputError(f"--port must be 1..65535, got {port}")
    cmd = [sys.executable, "-m", "streamlit", "run", str(MAIN), "--server.address", address,
           "--server.port", str(int(port)), "--server.headless", "true" if headless else "false",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    if db is not None:
        cmd += ["--", "--db", str(Path(db).expanduser().resolve())]
    return cmd


def main(db: str | os.PathLike | None, port: int = 8501, headless: bool = True, address: str = "127.0.0.1") -> int:
    """Run the dashboard in the foreground until interrupted; returns Streamlit's exit code. A store path that
    does not exist is refused with one line (the app itself also says how to make one)."""
    if db is not None and not Path(db).expanduser().exists():
        raise InputError(f"no store at {db}; make one with `routelens demo --db {db}` or "
                         f"`routelens trace MODEL --input FILE --db {db}`")
    print(f"routelens app: http://{address}:{port}/  (store: {db or 'choose one in the sidebar'}; Ctrl-C stops)",
          flush=True)
    try:
        return subprocess.call(command(db, port, headless=headless, address=address))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m routelens.app.launch")
    p.add_argument("--db", default=None)
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="127.0.0.1")
    a = p.parse_args()
    sys.exit(main(a.db, a.port, True, a.address))
