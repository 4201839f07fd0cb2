"""The real node's host network: one bridge that carries the node's address (the API server,
kubelet and CoreDNS listen on it; pods reach them through their default route) and the
pods' addresses (the CNI bridge plugin attaches them to it), and packet-filter rules that
drop anything from or to the pods that is routed off the bridge, so pod and Service traffic
never leaves this machine. `close()` removes what `open()` made, plus every KUBE-* chain
that kube-proxy or the kubelet added."""
from __future__ import annotations

import ipaddress
import shlex
import shutil
import subprocess

BRIDGE = "ddetr-node0"
POD_CIDR = ipaddress.ip_network("10.216.0.0/24")
NODE_IP = str(POD_CIDR.network_address + 1)
CHAIN = "DDETR-REAL-NODE"
TABLES = ("filter", "nat", "mangle")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result


def exists() -> bool:
    return sh("ip", "link", "show", BRIDGE, check=False).returncode == 0


def open_network() -> None:
    """The bridge with the node address, and the rules that keep pod traffic on it."""
    if exists():
        raise RuntimeError(f"interface {BRIDGE} exists: another real node is up "
                           "(scripts/local-cluster.sh down removes it)")
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{NODE_IP}/{POD_CIDR.prefixlen}", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    sh("iptables", "-w", "-N", CHAIN)
    cidr = str(POD_CIDR)
    for rule in (("-s", cidr, "-o", BRIDGE, "-j", "RETURN"), ("-s", cidr, "-j", "DROP"),
                 ("-d", cidr, "-i", BRIDGE, "-j", "RETURN"), ("-d", cidr, "-j", "DROP")):
        sh("iptables", "-w", "-A", CHAIN, *rule)
    sh("iptables", "-w", "-I", "FORWARD", "1", "-j", CHAIN)


def close_network() -> None:
    """Remove the bridge, our chain and the KUBE-* chains; quiet about what is gone already."""
    sh("ip", "link", "del", BRIDGE, check=False)
    while sh("iptables", "-w", "-D", "FORWARD", "-j", CHAIN, check=False).returncode == 0:
        pass
    sh("iptables", "-w", "-F", CHAIN, check=False)
    sh("iptables", "-w", "-X", CHAIN, check=False)
    for tool in ("iptables", "ip6tables"):
        if shutil.which(f"{tool}-save") is None:
            continue
        for table in TABLES:
            remove_kube_chains(tool, table)


def remove_kube_chains(tool: str, table: str) -> None:
    """Delete the jumps into KUBE-* chains from the built-in chains, then the chains."""
    dump = sh(f"{tool}-save", "-t", table, check=False).stdout.splitlines()
    chains = [line[1:].split()[0] for line in dump if line.startswith(":KUBE-")]
    if not chains:
        return
    for line in dump:
        parts = shlex.split(line)
        if parts[:1] == ["-A"] and not parts[1].startswith("KUBE-") and "-j" in parts \
                and parts[parts.index("-j") + 1].startswith("KUBE-"):
            sh(tool, "-w", "-t", table, "-D", *parts[1:], check=False)
    for chain in chains:
        sh(tool, "-w", "-t", table, "-F", chain, check=False)
    for chain in chains:
        sh(tool, "-w", "-t", table, "-X", chain, check=False)
