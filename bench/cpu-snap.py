#!/usr/bin/env python3
"""cpu-snap.py — CPU accounting snapshot used to tell whether a measurement ran on a
quiet machine. Prints: busy_jiffies steal_jiffies ours_jiffies clk_tck ncpu uptime_s
  busy  = user+nice+system+irq+softirq over all CPUs (/proc/stat)
  steal = hypervisor steal over all CPUs
  ours  = utime+stime+cutime+cstime of the given root PIDs and all their live
          descendants (dead children are in their parent's cutime/cstime)
Usage: cpu-snap.py PID [PID ...]    (e.g. the postmaster and the benchmark shell)
foreign CPU over an interval = d(busy) - d(ours).
Copied from the CDC-to-webhooks bench kit (bench-kit/cpu-snap.py) so bench/run is self-contained.
"""
import os
import sys

roots = {int(p) for p in sys.argv[1:] if p.isdigit()}
with open("/proc/uptime") as f:
    uptime = f.read().split()[0]
with open("/proc/stat") as f:
    cpu = f.readline().split()
user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in cpu[1:9])
busy = user + nice + system + irq + softirq

procs = {}
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        with open(f"/proc/{d}/stat") as f:
            s = f.read()
    except OSError:
        continue
    rest = s[s.rfind(")") + 2:].split()
    ppid = int(rest[1])
    t = sum(int(x) for x in rest[11:15])  # utime stime cutime cstime
    procs[int(d)] = (ppid, t)

children = {}
for pid, (ppid, _) in procs.items():
    children.setdefault(ppid, []).append(pid)
seen = set()
stack = [p for p in roots if p in procs]
while stack:
    p = stack.pop()
    if p in seen:
        continue
    seen.add(p)
    stack.extend(children.get(p, []))
ours = sum(procs[p][1] for p in seen)
print(busy, steal, ours, os.sysconf("SC_CLK_TCK"), os.cpu_count(), uptime)
