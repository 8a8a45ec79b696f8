"""Load check: a whole study on a real SuperLink with 20 SuperNodes on loopback; memory and time per round.

Not a timed test: it prints what it measured. Every site is a real ``flower-supernode`` process with its own
table (``benchmarks.rounds.make_sites``: 120 synthetic patients, 9 radiomic features + volume + clinical
covariates, scanner shifts), run with fedrad's fast site runtime (``fedrad.client.fastpath``: on loopback one
preloaded zygote forks the SuperNodes, their SuperExecs and every ClientApp, and the ServerApp; stock Flower
starts one fresh ``flwr-clientapp`` process per site and round trip, and on a small machine those process starts
dominate the round time). Memory is sampled from /proc
over the whole process tree (SuperLink, ServerApp, SuperNodes, their SuperExecs, zygote, ClientApps): the sum
of proportional set sizes (PSS, what the tree uses together) every 5 s, and resident set sizes every 0.5 s (an
RSS sum counts the pages forked ClientApps share with their zygote once per process, so it overstates). The
baseline, measured in the same run, is the same study in-process (Flower's message layer, no processes): its
wall time and this process's peak RSS.

    python -m benchmarks.load                 # 20 sites
    python -m benchmarks.load --sites 5       # a smaller check

Every site is asked at once (``--max-concurrent 0``, the default): the fast runtime forks each ClientApp from
a preloaded zygote, so 20 of them start together on 2 cores within Flower's 30 s task-activation window.
``--max-concurrent N`` asks at most N sites at a time within each round trip (run config
``max-concurrent-sites``); Flower's stock SuperNode needs it on a small machine: 20 fresh ``flwr-clientapp``
processes importing together on 2 cores miss that window, the SuperNodes start new ones, and the machine
spirals (seen here: 85 clientapp processes and no reply after 6 minutes). Hospitals each run their own machine
and need no limit.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.rounds import make_sites

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _proc_table() -> dict[int, tuple[int, str, int]]:
    """``{pid: (ppid, command name, rss in kB)}`` for every process readable in /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(entry)] = (int(fields[1]), name, int(fields[21]) * PAGE_KB)
        except (OSError, ValueError, IndexError):
            continue
    return out


def _pss_kb(pid: int) -> int:
    """Proportional set size of a process (kB): its private pages plus its share of pages it shares, so a sum
    over processes is the memory they use together (an RSS sum counts a zygote's pages once per child)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TreeSampler(threading.Thread):
    """Samples the RSS of every descendant of this process by role, every ``period`` seconds."""

    # stock Flower: each role is its own command. The fast runtime of a loopback deployment forks the SuperNodes,
    # their SuperExecs and ClientApps, the SuperLink's SuperExec and the ServerApp from one zygote: those carry
    # the zygote's command line (their pages are shared with it until written) and are named by the zygote's log,
    # which also names the small launcher processes that only relay signals and exit status to them
    ROLES = (("clientapp", "flwr-clientapp"), ("serverapp", "flwr-serverapp"), ("supernode", "flower-supernode"),
             ("supernode", "fastpath supernode"), ("zygote", "fastpath zygote"),
             ("superlink", "flower-superlink"), ("superexec", "flower-superexec"))
    FORKED = re.compile(r"(SuperNode|SuperExec|ServerApp) \((?:launcher|shim) pid (\d+)\) forked from the zygote "
                        r"as pid (\d+)|ClientApp of launcher pid (\d+) runs as pre-forked pid (\d+)")

    def __init__(self, period: float = 0.5, pss_every: int = 10, zygote_log: Path | None = None):
        super().__init__(daemon=True)
        self.period, self.samples, self._halt = period, [], threading.Event()
        self.pss_every, self.peak_pss_kb = pss_every, 0
        self.peak_by_role: dict[str, int] = {}
        self.peak_count: dict[str, int] = {}
        self._roles: dict[int, str] = {}
        self.zygote_log, self._forks, self._log_read = zygote_log, {}, 0

    def _read_zygote_log(self) -> None:
        try:
            with open(self.zygote_log, "rb") as f:
                f.seek(self._log_read)
                text = f.read().decode(errors="replace")
        except (OSError, TypeError):
            return
        text = text[:text.rfind("\n") + 1]
        self._log_read += len(text.encode())
        for m in self.FORKED.finditer(text):
            what, launcher, pid = (m[1], m[2], m[3]) if m[1] else ("ClientApp", m[4], m[5])
            self._forks[int(pid)] = what.lower()
            self._forks[int(launcher)] = "launchers"

    def _role(self, pid: int, ppid: int) -> str:
        if pid not in self._roles:
            if self.zygote_log is not None and pid not in self._forks:
                self._read_zygote_log()
            if pid in self._forks:
                self._roles[pid] = self._forks[pid]
            else:
                cmd = _cmdline(pid)
                role = next((r for r, key in self.ROLES if key in cmd), "other")
                if self.zygote_log is not None and self.zygote_log.exists():
                    if role == "zygote" and ppid != os.getpid():
                        return "zygote fork"  # a fork not named in the log yet: asked again at the next sample
                    if role not in ("zygote", "superlink", "other"):
                        return role  # a launcher that the log names once its fork is made: asked again
                self._roles[pid] = role
        return self._roles[pid]

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            table = _proc_table()
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            todo, tree = list(children.get(me, [])), []
            while todo:
                pid = todo.pop()
                tree.append(pid)
                todo.extend(children.get(pid, []))
            by_role: dict[str, list[int]] = {}
            for pid in tree:
                by_role.setdefault(self._role(pid, table[pid][0]), []).append(table[pid][2])
            total = sum(sum(v) for v in by_role.values())
            if len(self.samples) % self.pss_every == 0:  # PSS: shared pages split among their sharers
                self.peak_pss_kb = max(self.peak_pss_kb, sum(_pss_kb(pid) for pid in tree))
            self.samples.append((time.monotonic(), total))
            for role, rss in by_role.items():
                self.peak_by_role[role] = max(self.peak_by_role.get(role, 0), sum(rss))
                self.peak_count[role] = max(self.peak_count.get(role, 0), len(rss))
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    @property
    def peak_total_kb(self) -> int:
        return max((s[1] for s in self.samples), default=0)


ROUND_LINE = re.compile(r"round (\d+) \(([^)]*)\): (\d+) of (\d+) sites answered in ([\d.]+) s")


def run_deployment(cfg: dict, nodes: list[dict], root: Path, max_concurrent: int) -> dict:
    from fedrad.server.plans import write_json_atomic
    from fedrad.server.runtime import LoopbackDeployment, SiteNode

    write_json_atomic({"task": "study", "config": cfg}, root / "plan.json")
    sites = [SiteNode(n["site-name"], {k: v for k, v in n.items() if k != "site-name"}) for n in nodes]
    from fedrad.local import approve_plan_file_at_sites

    approve_plan_file_at_sites(root / "plan.json", nodes)  # each site's operator approves the published plan
    sampler = TreeSampler(zygote_log=root / "flower" / "zygote.log")
    sampler.start()
    t0 = time.perf_counter()
    try:
        with LoopbackDeployment(root / "flower", sites) as dep:
            t_up = time.perf_counter() - t0
            run_id = dep.submit({"plan": str(root / "plan.json"), "out-dir": str(root / "out"),
                                 "expected-sites": len(nodes), "round-timeout": 1200.0,
                                 "max-concurrent-sites": max_concurrent})
            status = dep.wait(run_id, timeout=4 * 3600, done_file=root / "out" / "results.json", finished=False)
    finally:
        sampler.stop()
    wall = time.perf_counter() - t0
    if status["status"] not in ("finished:completed", "results-written"):
        raise SystemExit(f"the study did not complete: {status}; logs under {root / 'flower'}")
    res = json.loads((root / "out" / "results.json").read_text())
    rounds = [(int(m[1]), m[2], int(m[3]), int(m[4]), float(m[5]))
              for m in ROUND_LINE.finditer((root / "out" / "progress.log").read_text())]
    return {"results": res, "rounds": rounds, "wall": wall, "startup": t_up, "sampler": sampler}


def run_local(cfg: dict, nodes: list[dict]) -> tuple[dict, float]:
    from fedrad.local import run_study_in_process

    t0 = time.perf_counter()
    res = run_study_in_process(cfg, nodes)
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=20)
    ap.add_argument("--max-concurrent", type=int, default=0,
                    help="sites asked at once within a round trip (default 0: all)")
    args = ap.parse_args()
    k = args.sites
    with tempfile.TemporaryDirectory(prefix=f"fedrad-load-{k}-") as tmp:
        root = Path(tmp)
        cfg, nodes = make_sites(root / "local", k)
        local_res, local_secs = run_local(cfg, nodes)
        local_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cfg, nodes = make_sites(root / "deployment", k)
        dep = run_deployment(cfg, nodes, root / "deployment", args.max_concurrent)
    res, rounds, s = dep["results"], dep["rounds"], dep["sampler"]
    print(f"load check: {k} SuperNodes + SuperLink on loopback, {os.cpu_count()} cores, at most "
          f"{args.max_concurrent or k} sites asked at once")
    print(f"study completed: {res['round_trips']} round trips, {len(res.get('missing_sites') or {})} sites missing, "
          f"wall time {dep['wall']:.0f} s (processes up in {dep['startup']:.0f} s)")
    for r, phase, got, of, secs in rounds:
        print(f"  round {r:2d} {phase:<13s} {got:2d} of {of} sites answered in {secs:6.1f} s")
    secs = [r[-1] for r in rounds]
    print(f"time per round trip: median {statistics.median(secs):.1f} s, max {max(secs):.1f} s, "
          f"sum {sum(secs):.0f} s")
    print(f"memory of the whole tree: peak proportional set size (PSS, shared pages counted once; sampled every "
          f"{s.period * s.pss_every:g} s) {s.peak_pss_kb / 1024:.0f} MB; peak resident set size summed over "
          f"processes {s.peak_total_kb / 1024:.0f} MB (counts shared pages once per process; role peaks below are "
          f"RSS, each at its own instant)")
    for role in ("superlink", "serverapp", "supernode", "superexec", "clientapp", "zygote", "zygote fork",
                 "launchers", "other"):
        if role in s.peak_by_role:
            print(f"  peak {role:11s}: {s.peak_by_role[role] / 1024:7.0f} MB over {s.peak_count[role]:2d} processes "
                  f"({s.peak_by_role[role] / 1024 / max(1, s.peak_count[role]):.0f} MB each)")
    print(f"baseline, same study in-process (no Flower processes): {local_res['round_trips']} round trips, "
          f"{local_secs:.1f} s, peak RSS {local_peak_mb:.0f} MB")
    print(f"ratios deployment / in-process: wall time x{dep['wall'] / local_secs:.1f}, "
          f"peak memory (PSS) x{s.peak_pss_kb / 1024 / local_peak_mb:.1f}")
    same = all(abs(local_res["external"][site]["radiomics"]["auc"]["auc"]
                   - res["external"][site]["radiomics"]["auc"]["auc"]) < 1e-9 for site in local_res["external"])
    print(f"external AUCs of the radiomic signature equal in-process and deployment (1e-9): {same}")


if __name__ == "__main__":
    main()
