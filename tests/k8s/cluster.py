"""A real Kubernetes API server on loopback for the operator's tests: etcd plus
thynapse-test-apiserver (upstream apiextensions-apiserver with storage for the built-in
types), built by scripts/k8s-apiserver-build from Debian's packaged sources.

Authentication is by client certificate (a private CA, a client in `system:masters`); the
server's delegated authentication and authorization point at itself, as the standalone
apiextensions-apiserver needs.
"""

import os
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = ROOT / "target" / "k8s-sid" / "bin"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build():
    """Builds the API server and etcd when absent (a few minutes, once)."""
    subprocess.run([str(ROOT / "scripts" / "k8s-apiserver-build")], check=True)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: Path):
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=thynapse-test-ca", cwd=d)
    for name, subj, ext in [
        ("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "/O=system:masters/CN=thynapse-test-admin", "extendedKeyUsage=clientAuth"),
    ]:
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subj, cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


class ApiServer:
    def __init__(self):
        build()
        self.dir = Path(tempfile.mkdtemp(prefix="thynapse-k8s-"))
        make_certs(self.dir)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        etcd_client, etcd_peer = free_port(), free_port()
        self.kubeconfig = self.dir / "kubeconfig"
        self.kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{self.url}", certificate-authority: "{self.dir / 'ca.crt'}"}}
users:
- name: admin
  user: {{client-certificate: "{self.dir / 'client.crt'}", client-key: "{self.dir / 'client.key'}"}}
contexts:
- name: test
  context: {{cluster: test, user: admin, namespace: default}}
current-context: test
""")
        self.log = open(self.dir / "log.txt", "w")
        self.etcd = subprocess.Popen(
            [str(BIN / "etcd"), "--data-dir", str(self.dir / "etcd"), "--unsafe-no-fsync",
             "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
             "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
             "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
             "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.proc = subprocess.Popen(
            [str(BIN / "thynapse-test-apiserver"),
             "--etcd-servers", f"http://127.0.0.1:{etcd_client}",
             "--bind-address", "127.0.0.1", "--secure-port", str(self.port),
             "--tls-cert-file", str(self.dir / "server.crt"), "--tls-private-key-file", str(self.dir / "server.key"),
             "--client-ca-file", str(self.dir / "ca.crt"),
             "--authentication-kubeconfig", str(self.kubeconfig), "--authorization-kubeconfig", str(self.kubeconfig),
             "--kubeconfig", str(self.kubeconfig), "--authentication-tolerate-lookup-failure",
             "--disable-admission-plugins", "NamespaceLifecycle,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.ssl = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        self.ssl.load_cert_chain(str(self.dir / "client.crt"), str(self.dir / "client.key"))
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.get("/livez") == b"ok":
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"API server did not start: {(self.dir / 'log.txt').read_text()[-3000:]}")
            time.sleep(0.1)

    def get(self, path):
        with urllib.request.urlopen(self.url + path, context=self.ssl, timeout=5) as r:
            return r.read()

    def env(self):
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def stop(self):
        for p in (self.proc, self.etcd):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.log.close()
