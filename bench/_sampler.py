"""A poor man's py-spy for the operator: run ``dptr-operator`` with a stack sampler.

    .venv/bin/python bench/_sampler.py OUT.txt [operator args ...]

Every 5 ms a thread records the Python stack of every other thread (sys._current_frames);
samples whose innermost frame is a blocking wait (lock, socket read, select) are counted
as idle.  At exit (SIGTERM) it writes to OUT.txt: CPU time per thread (from
/proc/self/task), and the functions most often on the stack of busy threads (inclusive
and innermost).  cProfile would see only the main thread; the operator's work is in
threads.
"""

from __future__ import annotations

import atexit
import collections
import os
import sys
import threading
from pathlib import Path

BLOCKING = {
    ("threading.py", "wait"),
    ("threading.py", "_wait_for_tstate_lock"),
    ("socket.py", "readinto"),
    ("ssl.py", "read"),
    ("ssl.py", "recv_into"),
    ("selectors.py", "select"),
    ("queue.py", "get"),
    ("socketserver.py", "serve_forever"),
}


def main() -> None:
    out = Path(sys.argv[1])
    sys.argv = ["dptr-operator", *sys.argv[2:]]
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    by_thread: collections.Counter[str] = collections.Counter()
    totals = {"busy": 0, "idle": 0}
    me = threading.get_ident()
    stop = threading.Event()

    def sample() -> None:
        names = {}
        while not stop.wait(0.005):
            for t in threading.enumerate():
                names[t.ident] = t.name
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                key = (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name)
                if key in BLOCKING:
                    totals["idle"] += 1
                    continue
                totals["busy"] += 1
                name = names.get(tid, "?").rstrip("0123456789_-")
                by_thread[name] += 1
                seen = set()
                leaf = True
                f = frame
                while f is not None:
                    code = f.f_code
                    label = f"{code.co_filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{code.co_name}"
                    if leaf:
                        leaves[f"{label}:{f.f_lineno}"] += 1
                        leaf = False
                    if label not in seen:
                        inclusive[label] += 1
                        seen.add(label)
                    f = f.f_back

    def dump() -> None:
        stop.set()
        lines = [f"samples: busy {totals['busy']}, idle {totals['idle']} (every 5 ms, all threads)", ""]
        lines.append("CPU seconds per thread (/proc/self/task):")
        names = {t.native_id: t.name for t in threading.enumerate()}
        cpu: collections.Counter[str] = collections.Counter()
        for task in Path("/proc/self/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            parts = stat[stat.rindex(")") + 2 :].split()
            secs = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
            name = names.get(int(task.name), stat[stat.index("(") + 1 : stat.rindex(")")])
            cpu[name.rstrip("0123456789_-")] += secs
        lines += [f"  {secs:8.2f}  {name}" for name, secs in cpu.most_common(25)]
        lines += ["", "busy samples per thread:"]
        lines += [f"  {n:8d}  {name}" for name, n in by_thread.most_common(25)]
        lines += ["", "inclusive (busy samples with the function on the stack):"]
        lines += [f"  {n:8d}  {label}" for label, n in inclusive.most_common(70)]
        lines += ["", "innermost frame of busy samples:"]
        lines += [f"  {n:8d}  {label}" for label, n in leaves.most_common(40)]
        out.write_text("\n".join(lines) + "\n")

    atexit.register(dump)
    threading.Thread(target=sample, name="sampler", daemon=True).start()
    from dptr_operator.cli import main as operator_main

    sys.exit(operator_main())


if __name__ == "__main__":
    main()
