#!/usr/bin/env python3
"""Load client and summariser for rolling.sh.

  rolling_client.py load --targets 127.0.0.1:P1,127.0.0.1:P2 --names svc --clients 6 \
      --seconds 15 --interval 0.005 --out results.jsonl
  rolling_client.py summary --dir DIR scenario1 scenario2 ...

`load`: N keep-alive clients (threads), each alternating between the targets as a round-robin
load balancer would, rotating through the names, GET /small with x-backstream-client-id and a
5 s timeout. Every answer or transport error is one JSON line:
  {"t0": start, "t1": end, "c": client, "tgt": target, "name": name, "res": "200" | "ERR:kind",
   "body": first 160 bytes, "ra": Retry-After, "hop": x-burrow-hop}
A kept-alive connection that the server closed while idle is detected before reuse (as urllib3
does) and replaced silently: that is not counted as an error. With --fresh, every request has a
connection of its own (as curl, or a load balancer that does not pool): during a graceful
upgrade those reach both processes, where kept-alive ones stay with the old one. With --post,
each request is POST /sink with a 200-byte body (a request with a body never waits as long for
its agent as one without).
"""
import argparse, http.client, json, os, select, socket, sys, threading, time, collections


def dropped(conn):
    s = conn.sock
    if s is None:
        return True
    try:
        r, _, _ = select.select([s], [], [], 0)
    except (ValueError, OSError):
        return True
    return bool(r)  # readable while idle = EOF (or garbage): not reusable


def client(cid, targets, names, deadline, interval, timeout, fresh, post, out, lock):
    conns = {}
    i = 0
    buf = []
    while time.time() < deadline:
        tgt = targets[(i + cid) % len(targets)]
        name = names[(i // len(targets) + cid) % len(names)]
        i += 1
        conn = conns.get(tgt)
        if conn is not None and dropped(conn):
            conn.close()
            conn = None
        if conn is None:
            host, port = tgt.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
            conns[tgt] = conn
        t0 = time.time()
        rec = {"t0": t0, "c": cid, "tgt": tgt, "name": name}
        try:
            if post:
                conn.request("POST", "/sink", body=b"x" * 200,
                             headers={"x-backstream-client-id": name})
            else:
                conn.request("GET", "/small", headers={"x-backstream-client-id": name})
            resp = conn.getresponse()
            body = resp.read()
            rec["res"] = str(resp.status)
            if resp.status != 200:
                rec["body"] = body[:160].decode("utf-8", "replace")
                rec["ra"] = resp.getheader("retry-after")
                rec["hop"] = resp.getheader("x-burrow-hop")
                rec["hdrs"] = {k.lower(): v for k, v in resp.getheaders()
                               if k.lower() not in ("date",)}
            if resp.will_close or fresh:
                conn.close()
                conns.pop(tgt, None)
        except Exception as e:  # transport error
            kind = type(e).__name__
            if isinstance(e, socket.timeout) or kind == "TimeoutError":
                kind = "timeout"
            rec["res"] = "ERR:" + kind
            rec["body"] = str(e)[:160]
            conn.close()
            conns.pop(tgt, None)
        rec["t1"] = time.time()
        buf.append(rec)
        if len(buf) >= 200:
            with lock:
                out.write("".join(json.dumps(r) + "\n" for r in buf))
            buf = []
        if interval > 0:
            time.sleep(interval)
    with lock:
        out.write("".join(json.dumps(r) + "\n" for r in buf))


def load(a):
    targets = a.targets.split(",")
    names = a.names.split(",")
    deadline = time.time() + a.seconds
    lock = threading.Lock()
    with open(a.out, "w") as out:
        ts = [threading.Thread(target=client, args=(c, targets, names, deadline, a.interval,
                                                    a.timeout, a.fresh, a.post, out, lock))
              for c in range(a.clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()


def read_marks(path):
    marks = []
    if os.path.exists(path):
        for line in open(path):
            p = line.split(None, 1)
            if len(p) == 2:
                marks.append((float(p[0]), p[1].strip()))
    return marks


def longest_failing_run(recs, key):
    """(milliseconds, requests) of the longest run of consecutive non-200s among the records
    sharing one value of `key`, in order of their start."""
    best = (0.0, 0)
    groups = collections.defaultdict(list)
    for r in recs:
        groups[r[key]].append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: r["t0"])
        start, n = None, 0
        for r in rs:
            if r["res"] == "200":
                start = None
                continue
            if start is None:
                start, n = r["t0"], 0
            n += 1
            best = max(best, ((r["t1"] - start) * 1000, n))
    return best


def summarise(d, scen):
    recs = [json.loads(l) for l in open(os.path.join(d, scen + ".jsonl")) if l.strip()]
    marks = read_marks(os.path.join(d, scen + ".marks"))
    ev = next((t for t, m in marks if m.startswith("EVENT")), recs[0]["t0"] if recs else 0)
    counts = collections.Counter(r["res"] for r in recs)
    # longest run of consecutive non-200s seen by one client, and for one agent name (all
    # clients): from the start of its first failing request to the end of its last one
    best = longest_failing_run(recs, "c")
    nbest = longest_failing_run(recs, "name")
    bad = [r for r in recs if r["res"] != "200"]
    # what an answer that came may have cost: a request held while its agent was away
    slowest = max(((r["t1"] - r["t0"]) * 1000 for r in recs if r["res"] == "200"), default=0.0)
    first = min((r["t0"] for r in bad), default=None)
    last = max((r["t1"] for r in bad), default=None)
    return {
        "scen": scen, "total": len(recs), "counts": counts, "slowest": slowest,
        "run_ms": best[0], "run_n": best[1], "nrun": nbest,
        "window": (f"{first - ev:+.2f}s..{last - ev:+.2f}s" if bad else "-"),
        "bad": bad, "marks": [(t - ev, m) for t, m in marks], "recs": recs,
    }


def summary(a):
    rows = [summarise(a.dir, s) for s in a.scenarios]
    print()
    print("longest non-200 run: per client (one keep-alive client's consecutive failures) and per name"
          " (consecutive failures of all requests for one agent name)")
    print(f"{'scenario':<37} {'total':>6}  {'run/client':>14}  {'run/name':>15}  {'slowest 200':>11}  {'non-200 window vs event':<24} counts")
    for r in rows:
        cs = " ".join(f"{k}={v}" for k, v in sorted(r["counts"].items(), key=lambda kv: kv[0]))
        run = f"{r['run_ms']:.0f}ms/{r['run_n']}req"
        nrun = f"{r['nrun'][0]:.0f}ms/{r['nrun'][1]}req"
        slowest = f"{r['slowest']:.0f}ms"
        print(f"{r['scen']:<37} {r['total']:>6}  {run:>14}  {nrun:>15}  {slowest:>11}  {r['window']:<24} {cs}")
    if a.details:
        print()
        print("== details: event marks and one sample per distinct non-200 answer ==")
        for r in rows:
            print(f"-- {r['scen']}")
            print("   marks: " + "; ".join(f"{t:+.2f}s {m}" for t, m in r["marks"]))
            seen = collections.OrderedDict()
            for b in r["bad"]:
                key = (b["res"], b["tgt"], (b.get("body") or "")[:60], b.get("ra"), b.get("hop"))
                if key not in seen:
                    seen[key] = [b, 0, b["t0"], b["t1"]]
                seen[key][1] += 1
                seen[key][2] = min(seen[key][2], b["t0"])
                seen[key][3] = max(seen[key][3], b["t1"])
            ev = r["marks"][0][0] if False else None
            evt = next((t for t, m in read_marks(os.path.join(a.dir, r["scen"] + ".marks"))
                        if m.startswith("EVENT")), 0)
            for (res, tgt, body, ra, hop), (b, n, t0, t1) in seen.items():
                lat = (b["t1"] - b["t0"]) * 1000
                print(f"   {res} via {tgt} x{n} [{t0 - evt:+.2f}s..{t1 - evt:+.2f}s] "
                      f"retry-after={ra} hop={hop} first-latency={lat:.0f}ms body={body!r}")
                if b.get("hdrs"):
                    print(f"      headers: {b['hdrs']}")


def main():
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    l = sp.add_parser("load")
    l.add_argument("--targets", required=True)
    l.add_argument("--names", default="svc")
    l.add_argument("--clients", type=int, default=6)
    l.add_argument("--seconds", type=float, default=15)
    l.add_argument("--interval", type=float, default=0.005)
    l.add_argument("--timeout", type=float, default=5)
    l.add_argument("--fresh", action="store_true")
    l.add_argument("--post", action="store_true")
    l.add_argument("--out", required=True)
    s = sp.add_parser("summary")
    s.add_argument("--dir", required=True)
    s.add_argument("--details", action="store_true")
    s.add_argument("scenarios", nargs="+")
    a = p.parse_args()
    load(a) if a.cmd == "load" else summary(a)


if __name__ == "__main__":
    main()
