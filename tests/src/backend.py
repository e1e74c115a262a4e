"""A test backend: HTTP on port 8080, a UDP echo on port 5300 and a UDP sink on port 5399, on
every address given.

  GET /          -> "NAME saw CLIENT_ADDR CLIENT_PORT"   (the address the backend saw)
  GET /health    -> 200, or 500 while the file DIR/sick exists
  GET /stream?seconds=S&rate=BYTES_PER_S -> a body streamed for S seconds
  GET /bytes?n=N -> a body of N bytes, as fast as TCP takes it
  UDP datagram   -> "NAME saw CLIENT_ADDR CLIENT_PORT: DATA"
  UDP "big N"    -> that text padded with "x" to exactly N bytes (N above the MTU: the
                    backend's own stack fragments the reply)
  UDP to 5399    -> no answer; logged as "NAME sink SOURCE_ADDR SOURCE_PORT DATA"

Every request is logged to stdout as "NAME CLIENT_ADDR PATH". Usage: backend.py NAME DIR ADDR...
"""
import http.server
import os
import socket
import socketserver
import sys
import threading
import time
import urllib.parse

NAME, DIR, ADDRS = sys.argv[1], sys.argv[2], sys.argv[3:]


def log(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        client = self.client_address
        log(f"{NAME} {client[0]} {url.path}")
        if url.path == "/health":
            sick = os.path.exists(os.path.join(DIR, "sick"))
            self.reply(500 if sick else 200, b"sick\n" if sick else b"ok\n")
        elif url.path == "/stream":
            q = urllib.parse.parse_qs(url.query)
            seconds = float(q.get("seconds", ["5"])[0])
            rate = int(q.get("rate", ["100000"])[0])
            total = int(seconds * rate)
            self.send_response(200)
            self.send_header("Content-Length", str(total))
            self.end_headers()
            chunk = max(1, rate // 20)
            sent = 0
            while sent < total:
                n = min(chunk, total - sent)
                self.wfile.write(b"x" * n)
                sent += n
                time.sleep(n / rate)
        elif url.path == "/bytes":
            total = int(urllib.parse.parse_qs(url.query).get("n", ["1000000"])[0])
            self.send_response(200)
            self.send_header("Content-Length", str(total))
            self.end_headers()
            chunk = b"x" * 65536
            sent = 0
            while sent < total:
                n = min(len(chunk), total - sent)
                self.wfile.write(chunk[:n])
                sent += n
        else:
            self.reply(200, f"{NAME} saw {client[0]} {client[1]}\n".encode())


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        # HTTPServer's own looks the address up in DNS (getfqdn): 5 s in a namespace with
        # no resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class Server6(Server):
    address_family = socket.AF_INET6


def udp_socket(addr, port):
    # Bound before "listening" is logged: a test may send as soon as it reads that line.
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    return s


def udp_echo(s):
    while True:
        data, peer = s.recvfrom(4096)
        log(f"{NAME} {peer[0]} udp")
        reply = f"{NAME} saw {peer[0]} {peer[1]}: ".encode() + data
        words = data.split()
        if len(words) >= 2 and words[0] == b"big" and words[1].isdigit():
            size = int(words[1])
            reply = reply[:size] + b"x" * (size - len(reply))
        s.sendto(reply, peer)


def udp_sink(s):
    while True:
        data, peer = s.recvfrom(4096)
        log(f"{NAME} sink {peer[0]} {peer[1]} {data.decode(errors='replace')}")


for addr in ADDRS:
    server = (Server6 if ":" in addr else Server)((addr, 8080), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Thread(target=udp_echo, args=(udp_socket(addr, 5300),), daemon=True).start()
    threading.Thread(target=udp_sink, args=(udp_socket(addr, 5399),), daemon=True).start()
log(f"{NAME} listening on {' '.join(ADDRS)}")
threading.Event().wait()
