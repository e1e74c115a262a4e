"""A test client: short HTTP/1.0 requests, one new connection each.

  client.py count URL N [SOURCE]      N requests; prints "NAME SEEN_ADDR" or "ERR reason" per request
  client.py loop URL SECONDS GAP [THREADS [ORIGIN]]
                                      THREADS workers (default 1), each requesting every GAP s for
                                      SECONDS; prints "T NAME|ERR" per request, T in seconds since
                                      ORIGIN (a CLOCK_MONOTONIC time; default: the client's start)

The backend answers "NAME saw ADDR PORT".
"""
import socket
import sys
import threading
import time
import urllib.parse


def get(url, source=None, timeout=1.0):
    u = urllib.parse.urlparse(url)
    host = u.hostname
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if source:
            s.bind((source, 0))
        s.connect((host, u.port or 80))
        s.sendall(f"GET {u.path or '/'} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.0 200"):
            return "ERR status " + head.split(b"\r\n")[0].decode(errors="replace")
        words = body.decode().split()
        return f"{words[0]} {words[2]}"
    except Exception as e:  # a test client: every failure is a result
        return f"ERR {type(e).__name__}"
    finally:
        s.close()


mode, url = sys.argv[1], sys.argv[2]
if mode == "count":
    n = int(sys.argv[3])
    source = sys.argv[4] if len(sys.argv) > 4 else None
    for _ in range(n):
        print(get(url, source), flush=True)
elif mode == "loop":
    seconds, gap = float(sys.argv[3]), float(sys.argv[4])
    threads = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    start = time.monotonic()
    origin = float(sys.argv[6]) if len(sys.argv) > 6 else start
    lock = threading.Lock()

    def worker():
        while time.monotonic() - start < seconds:
            t = time.monotonic() - origin
            answer = get(url).split()[0]
            with lock:
                print(f"{t:.3f} {answer}", flush=True)
            time.sleep(gap)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
