"""Two emulated "nodes" on one machine: two network namespaces joined by a veth pair, optionally shaped.

``NetnsLink`` creates ``datds-<pid>-<id>-0`` and ``datds-<pid>-<id>-1`` (``pid``: the process that owns
them), one veth end in each with the address
``10.231.<id>.1`` / ``.2`` (a /30 that exists only between these two namespaces, so traffic can go nowhere
else), brings loopback up in both and can shape the link with ``tc ... tbf`` on both ends (each end
shapes what it sends, so both directions get the rate). Everything it creates is deleted on ``close()``
(also when the body of ``with`` raised); ``remove_leftovers()`` deletes the ``datds-*`` namespaces and
links whose owner is gone (a killed process left them), never those of a live process (a benchmark
running next to a test session). Needs root and iproute2; ``unavailable()`` says why not in one line.
No torch here.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

log = logging.getLogger(__name__)

PREFIX = "datds-"  # every namespace we create; interfaces are "datds<id>n<node>" (IFNAMSIZ: 15 characters)
SUBNET = "10.231"  # 10.231.<id>.0/30 per link: private, and only ever assigned inside our namespaces
_CMD_TIMEOUT_S = 20.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, check=check)


def unavailable() -> str | None:
    """Why two namespaces cannot be made here (one line), or None when they can."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, e.g. in a container or with sudo)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install iproute2)"
    probe = f"{PREFIX}{os.getpid()}-0-probe"  # owned by this process, so no cleanup elsewhere takes it
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip() or made.returncode}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def namespaces() -> list[str]:
    """Names of our namespaces that exist now (``datds-*``)."""
    if shutil.which("ip") is None:
        return []
    out = _ip("netns", "list", check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.split() and ln.split()[0].startswith(PREFIX)]


def _owner_and_id(name: str) -> tuple[int, int] | None:
    parts = name.split("-")  # datds-<pid>-<id>-<node>
    if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(also_owner: int | None = None) -> list[str]:
    """Delete ``datds-*`` namespaces whose owning process is gone (or is ``also_owner``), and ``datds*``
    links left in this namespace that no live owner's namespaces account for; returns their names."""
    removed, live_ids = [], set()
    for name in namespaces():
        owner = _owner_and_id(name)
        if owner is not None and owner[0] != also_owner and _alive(owner[0]):
            live_ids.add(owner[1])
            continue
        _ip("netns", "del", name, check=False)
        removed.append(name)
    if shutil.which("ip") is not None:
        for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
            parts = line.split(":")
            ifname = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
            digits = ifname[len("datds"):].split("n")[0]
            if ifname.startswith("datds") and not (digits.isdigit() and int(digits) in live_ids):
                _ip("link", "del", ifname, check=False)
                removed.append(ifname)
    if removed:
        log.warning("removed leftover network namespaces/links: %s", ", ".join(removed))
    return removed


def _free_id() -> int:
    taken = {owner[1] for n in namespaces() if (owner := _owner_and_id(n)) is not None}
    start = os.getpid() % 200  # concurrent processes (a test and a benchmark) start at different ids
    for k in range(200):
        i = (start + k) % 200 + 20
        if i not in taken:
            return i
    raise RuntimeError("no free datds link id (200 links in use?)")


class NetnsLink:
    """Two namespaces joined by one veth pair; ``with NetnsLink() as link: link.exec_prefix(0) ...``."""

    def __init__(self):
        self.id = _free_id()
        self.names = (f"{PREFIX}{os.getpid()}-{self.id}-0", f"{PREFIX}{os.getpid()}-{self.id}-1")
        self.ifnames = (f"datds{self.id}n0", f"datds{self.id}n1")
        self.addrs = (f"{SUBNET}.{self.id}.1", f"{SUBNET}.{self.id}.2")
        self.rate_mbit: float | None = None
        self._open = False

    def __enter__(self) -> NetnsLink:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        self._open = True  # close() removes whatever part of this was made
        try:
            for ns in self.names:
                _ip("netns", "add", ns)
            _ip("link", "add", self.ifnames[0], "type", "veth", "peer", "name", self.ifnames[1])
            for ns, ifname, addr in zip(self.names, self.ifnames, self.addrs):
                _ip("link", "set", ifname, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", ifname)
                _ip("-n", ns, "link", "set", ifname, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as e:
            self.close()
            raise RuntimeError(f"could not set up the namespace link: {' '.join(e.cmd)}: {e.stderr.strip()}") from None
        log.debug("link %s (%s) <-> %s (%s)", self.names[0], self.addrs[0], self.names[1], self.addrs[1])

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        for ns in self.names:  # deleting a namespace deletes the veth end inside it, and so its peer
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.ifnames[0], check=False)  # only if the move into a namespace never happened

    def exec_prefix(self, node: int) -> tuple[str, ...]:
        """The command prefix that runs a program inside node ``node``'s namespace."""
        return ("ip", "netns", "exec", self.names[node])

    def shape(self, rate_mbit: float | None) -> None:
        """Limit both directions to ``rate_mbit`` Mbit/s (token bucket); None removes the limit."""
        for ns, ifname in zip(self.names, self.ifnames):
            _ip("-n", ns, "link", "set", ifname, "up")
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", ifname, "root"],
                           capture_output=True, timeout=_CMD_TIMEOUT_S)
            if rate_mbit is not None:
                # The bucket must hold at least one timer tick of traffic, or tbf undershoots its rate.
                burst = max(4096, int(rate_mbit * 1e6 / 8 / 100))
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ifname, "root", "tbf",
                                "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "50ms"],
                               check=True, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
        self.rate_mbit = rate_mbit

    def set_link(self, node: int, up: bool) -> None:
        """Bring node ``node``'s end of the link up or down: that node loses its network (its peer's end loses
        the carrier too), without a packet of goodbye -- what a pulled cable or a dead switch port does."""
        _ip("-n", self.names[node], "link", "set", self.ifnames[node], "up" if up else "down")

    def link_up(self, node: int) -> bool:
        """Whether node ``node``'s end of the link is administratively up."""
        import json

        out = _ip("-n", self.names[node], "-j", "link", "show", self.ifnames[node]).stdout
        return "UP" in json.loads(out)[0]["flags"]

    def tx_bytes(self, node: int) -> int:
        """Bytes node ``node`` has sent over the link so far (the veth end's counter)."""
        out = _ip("-n", self.names[node], "-s", "-j", "link", "show", self.ifnames[node]).stdout
        import json

        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def throughput_mb_s(self, nbytes: int = 4 << 20, timeout_s: float = 30.0) -> float:
        """Measured MB/s from node 0 to node 1 over the link (a TCP stream of ``nbytes``)."""
        import sys

        port = 29000 + self.id
        server = ("import socket,sys,time\n"
                  f"s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{self.addrs[1]}',{port}))\n"
                  "s.listen(1);s.settimeout(%d);c,_=s.accept();c.settimeout(%d);n=0\n"
                  "while n<%d:\n b=c.recv(1<<20)\n if not b: break\n n+=len(b)\n"
                  "c.sendall(b'k');print(n)\n") % (timeout_s, timeout_s, nbytes)
        client = ("import socket,time\n"
                  "for _ in range(100):\n"
                  " try:\n"
                  f"  c=socket.create_connection(('{self.addrs[1]}',{port}),timeout=%d);break\n"
                  " except OSError: time.sleep(0.05)\n"
                  "t=time.perf_counter();c.sendall(bytes(%d));c.recv(1);print(time.perf_counter()-t)\n") % (timeout_s, nbytes)
        srv = subprocess.Popen([*self.exec_prefix(1), sys.executable, "-c", server], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            out = subprocess.run([*self.exec_prefix(0), sys.executable, "-c", client], capture_output=True,
                                 text=True, timeout=timeout_s + 5, check=True)
            srv.wait(timeout=timeout_s + 5)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
        seconds = float(out.stdout.strip())
        return nbytes / seconds / 1e6


def owned_by(pid: int) -> list[str]:
    """The ``datds-*`` namespaces process ``pid`` created that still exist."""
    return [n for n in namespaces() if (owner := _owner_and_id(n)) is not None and owner[0] == pid]
