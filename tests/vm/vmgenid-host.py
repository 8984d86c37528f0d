#!/usr/bin/env python3
"""The host side of tests/vm's `vmgenid` check (run's vmgenid_guest).

Usage: vmgenid-host.py --ekey EKEY --control SOCKET --times N --bytes B
         --limit SECONDS --work DIR --out RESULTS --console LOG -- QEMU-COMMAND...

Boots the guest (QEMU-COMMAND, plus -device vmgenid with a fresh guid and
a QMP socket; its console appended to LOG). Its `ekey-host feed` (init.sh,
vmonly=vmgenid) is a client of the daemon's EGD TCP port through QEMU's
guestfwd, so the daemon sees each QEMU as one client. Polling the daemon's
`status --json` every POLL s: once that client has the feed's initial fill
and has been idle for QUIET s, the guest is stopped, its state saved (QMP
`migrate` to a file) and QEMU quit; a new QEMU with another guid restores
the state (-incoming defer, `migrate-incoming`): the guest runs on with a
new VM generation ID, as after a snapshot restore or a clone. (QEMU cannot
change the guid of a running guest: qom-set refuses it.) Then the new
QEMU's client should be served --bytes fresh bytes; once it has been idle
for QUIET s again, the next restore; --times in all. Then it waits for the
guest to finish.

Times are this machine's clock (time.time(); QMP event timestamps are the
same clock) on both ends. Writes RESULTS/vmgenid.host.json (the restores
and what was seen) and RESULTS/vmgenid.polls.jsonl (every status poll: t0
and t1 around it, the TCP clients); prints a line per restore; exits with
the last QEMU's status (124 if the guest overran --limit). check.py judges
the files.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
import uuid

POLL = 0.1          # s between status polls
QUIET = 2.0         # s without a byte served: idle (and check.py's control window)
FILL = 1024         # feed --test-discard's initial fill (bytes) before it tops up
READY_LIMIT = 60.0  # s for the guest to boot and feed to fill
SEEN_LIMIT = 3.0    # s after a restore to look for the fresh bytes (check.py wants 2)
QMP_LIMIT = 30.0    # s for a QMP reply, a migration or an event


class Qmp:
    """A QMP connection to one QEMU; keeps the events it reads."""

    def __init__(self, path, proc):
        end = time.time() + QMP_LIMIT
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > end or proc.poll() is not None:
                    raise RuntimeError(f"cannot connect to QEMU's QMP socket {path} "
                                       f"(QEMU exit {proc.poll()})")
                time.sleep(0.05)
        self.sock.settimeout(QMP_LIMIT)
        self.f = self.sock.makefile("rw")
        self.events = []
        greeting = self.read()
        if "QMP" not in greeting:
            raise RuntimeError(f"no QMP greeting: {greeting!r}")
        self.cmd("qmp_capabilities")

    def read(self):
        line = self.f.readline()
        if not line:
            raise RuntimeError("QEMU closed its QMP socket")
        return json.loads(line)

    def cmd(self, name, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            reply = self.read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error'].get('desc')}")
            return reply.get("return")

    def event(self, name):
        """Waits for the event NAME (or finds it among those read);
        returns its timestamp (s, this machine's clock)."""
        while True:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e)
                    ts = e.get("timestamp") or {}
                    return ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
            self.events.append(self.read())

    def close(self):
        self.sock.close()


def migrated(qmp, what):
    """Waits for the migration (saving or restoring the guest's state) to
    end; its status."""
    end = time.time() + QMP_LIMIT
    while True:
        status = (qmp.cmd("query-migrate") or {}).get("status")
        if status in ("completed", "failed", "cancelled"):
            return status
        if time.time() > end:
            raise RuntimeError(f"{what} the guest's state took more than {QMP_LIMIT:g} s ({status})")
        time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    for opt in ("--ekey", "--control", "--work", "--out", "--console"):
        ap.add_argument(opt, required=True)
    ap.add_argument("--times", type=int, default=2)
    ap.add_argument("--bytes", type=int, required=True)
    ap.add_argument("--limit", type=float, required=True)
    ap.add_argument("qemu", nargs="+")
    a = ap.parse_args()

    deadline = time.time() + a.limit
    polls = open(os.path.join(a.out, "vmgenid.polls.jsonl"), "w")
    console = open(a.console, "wb")
    state = os.path.join(a.work, "vmgenid.state")
    record = {"poll_s": POLL, "quiet_s": QUIET, "bytes": a.bytes, "times": a.times,
              "qemus": [], "ready": None, "restores": [], "error": None}

    def start(n, incoming):
        guid = str(uuid.uuid4())
        qmp_path = os.path.join(a.work, f"vmgenid.qmp{n}")
        if os.path.exists(qmp_path):
            os.unlink(qmp_path)
        console.write(f"==== vmgenid-host.py: QEMU {n}, guid {guid}"
                      f"{', restoring the saved state' if incoming else ''} ====\n".encode())
        console.flush()
        cmd = a.qemu + ["-device", f"vmgenid,id=vmgenid0,guid={guid}",
                        "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if incoming:
            cmd += ["-incoming", "defer"]
        t = time.time()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT)
        record["qemus"].append({"n": n, "guid": guid, "started": t})
        return proc, Qmp(qmp_path, proc), guid

    def poll():
        """One status poll: {client id: bytes_served} of the TCP clients."""
        t0 = time.time()
        try:
            out = subprocess.run([a.ekey, "status", "--json", "--control", a.control],
                                 capture_output=True, timeout=5, text=True)
            st, err = json.loads(out.stdout), None
        except (subprocess.SubprocessError, ValueError) as e:
            st, err = None, str(e)
        t1 = time.time()
        egd = (st or {}).get("egd") or {}
        clients = [{k: c.get(k) for k in ("id", "peer", "bytes_served", "requests_pending")}
                   for c in egd.get("clients") or [] if c.get("listener") == "tcp"]
        polls.write(json.dumps({"t0": t0, "t1": t1, "clients": clients,
                                "total_served": egd.get("total_served"), "error": err}) + "\n")
        polls.flush()
        return t1, {c["id"]: c.get("bytes_served") or 0 for c in clients}

    def until(cond, limit):
        """Polls every POLL s until cond(t, clients, since) (since: when the
        clients' bytes_served last changed) or for LIMIT s; the last
        (t, clients, since)."""
        end, last, since = time.time() + limit, None, time.time()
        while True:
            t, clients = poll()
            if clients != last:
                last, since = clients, t
            if cond(t, clients, since) or time.time() > end:
                return t, clients, since
            time.sleep(POLL)

    def idle(t, clients, since, client):
        return client in clients and t - since >= QUIET

    proc = qmp = None
    try:
        proc, qmp, _ = start(0, False)

        def filled(t, clients, since):
            return any(v >= FILL for v in clients.values()) and t - since >= QUIET
        t, clients, _ = until(lambda *x: filled(*x) or proc.poll() is not None, READY_LIMIT)
        mine = [i for i, v in clients.items() if v >= FILL]
        if not filled(t, clients, _) or len(mine) != 1:
            raise RuntimeError("the guest's feed did not become one idle EGD client of the daemon "
                               f"(after its {FILL}-byte fill) within {READY_LIMIT:.0f} s: {clients}")
        client = mine[0]
        known = set(clients)
        record["ready"] = {"t": t, "client": client, "served": clients[client]}
        print(f"vmgenid: the feed's client {client} is idle at {clients[client]} bytes served")
        for n in range(1, a.times + 1):
            r = {"n": n, "from_client": client, "base": clients.get(client)}
            record["restores"].append(r)
            r["t_stop"] = time.time()
            qmp.cmd("stop")
            qmp.cmd("migrate", uri=f"exec:cat > {state}")
            r["saved"] = migrated(qmp, "saving")
            r["state_bytes"] = os.path.getsize(state)
            qmp.cmd("quit")
            qmp.close()
            proc.wait(timeout=QMP_LIMIT)
            r["t_quit"] = time.time()
            if r["saved"] != "completed":
                raise RuntimeError(f"saving the guest's state: {r['saved']}")
            proc, qmp, guid = start(n, True)
            r["guid"] = guid
            qmp.cmd("migrate-incoming", uri=f"exec:cat {state}")
            r["restored"] = migrated(qmp, "restoring")
            r["guest_guid"] = (qmp.cmd("query-vm-generation-id") or {}).get("guid")
            if r["restored"] != "completed":
                raise RuntimeError(f"restoring the guest's state: {r['restored']}")
            # The state is of a stopped guest, so it stays stopped: go on.
            qmp.cmd("cont")
            r["t_resumed"] = qmp.event("RESUME")

            new = []

            def fresh(t, clients, since):
                new.extend(i for i in clients if i not in known and i not in new)
                return any(v >= a.bytes for i, v in clients.items() if i not in known)
            t, clients, _ = until(fresh, SEEN_LIMIT)
            r["new_clients"] = new
            if fresh(t, clients, _):
                client = next(i for i in new if clients[i] >= a.bytes)
                r["t_seen"], r["served_seen"] = t, clients[client]
                print(f"vmgenid: restore {n} (guid {guid}): the new QEMU's client {client} was "
                      f"served {clients[client]} bytes within {t - r['t_resumed']:.2f} s of the resume")
            else:
                if new:
                    client = new[0]
                print(f"vmgenid: restore {n} (guid {guid}): no fresh bytes within "
                      f"{SEEN_LIMIT:g} s of the resume (TCP clients now: {clients})")
            known |= set(clients)
            # Idle again: the next restore's control window (or, after the
            # last, the guest stops feed and powers off).
            if n < a.times:
                t, clients, _ = until(lambda t, c, since: idle(t, c, since, client), 3 * QUIET)
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
        record["error"] = str(e)
        print(f"vmgenid: {e}")
    # Until the guest is done (it powers off), still polling.
    until(lambda *x: proc is None or proc.poll() is not None or time.time() > deadline,
          max(0.0, deadline - time.time()))
    rc = None
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            rc = 124
        else:
            rc = proc.returncode
    if os.path.exists(state):
        os.unlink(state)
    console.close()
    with open(a.console, "rb") as f:
        raw = f.read()
    with open(a.console, "wb") as f:
        f.write(raw.replace(b"\r", b"").replace(b"\033", b""))
    record["exit"] = rc
    with open(os.path.join(a.out, "vmgenid.host.json"), "w") as f:
        json.dump(record, f, indent=1)
    return 124 if rc is None else rc


if __name__ == "__main__":
    sys.exit(main())
