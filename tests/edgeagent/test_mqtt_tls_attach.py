"""The MQTT TLS listener and attach mode: one agent, real mosquitto clients, a real mosquitto.

Certificates are made here (cryptography): a CA, a server certificate for 127.0.0.1 and a
client certificate, all signed by it. The attached broker is a mosquitto started on a free
loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeagent.config.mqtt_extra import check_attach_topic
from edgeagent.errors import ConfigError
from tests.edgeagent.inprocess import TIMEOUT, Running, call, make_agent, start, stop

CLIENTS = shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")
BROKER = shutil.which("mosquitto") or (
    Path("/usr/sbin/mosquitto").exists() and "/usr/sbin/mosquitto"
)
needs_clients = pytest.mark.skipif(not CLIENTS, reason="mosquitto-clients not installed")
needs_broker = pytest.mark.skipif(
    not (CLIENTS and BROKER), reason="mosquitto (broker and clients) not installed"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *, ca: bool = False, ip: str | None = None,
) -> x509.Certificate:  # fmt: skip
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """tmp/pki: ca.crt, server.crt/.key (IP 127.0.0.1), client.crt/.key, rogue.crt/.key
    (a client certificate from another CA)."""
    d = tmp_path / "pki"
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test ca", ca_key, None, ca=True)
    _write(d / "ca", ca, ca_key)
    for name, ip in (("server", "127.0.0.1"), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(d / name, _cert(name, key, (ca.subject, ca_key), ip=ip), key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("other ca", other_key, None, ca=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    _write(d / "rogue", _cert("rogue", rogue_key, (other.subject, other_key)), rogue_key)
    return d


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(body)
    return path


async def _run(args: list[str], timeout: float = 20) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _sub(port: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-W", "15", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


async def _tls_agent(tmp_path: Path, pki: Path, *, ca: bool) -> tuple[Running, int]:
    ca_line = f'tls_ca = "{pki / "ca.crt"}"\n' if ca else ""
    config = _config(tmp_path, f"""[mqtt]
tls_listen = "127.0.0.1:0"
tls_cert = "{pki / 'server.crt'}"
tls_key = "{pki / 'server.key'}"
{ca_line}""")  # fmt: skip
    running = await start(tmp_path / "a", "a", ["--mqtt", "127.0.0.1:0", "--config", str(config)])
    status = await call(running.state_dir, "status")
    return running, int(status["mqtt_tls"].rsplit(":", 1)[1])


async def _wait_connections(running: Running, count: int) -> None:
    for _ in range(200):
        if (await call(running.state_dir, "status"))["mqtt_stats"]["connections"] >= count:
            await asyncio.sleep(0.3)
            return
        await asyncio.sleep(0.05)
    raise AssertionError("clients did not connect")


@needs_clients
async def test_tls_listener_with_cafile(tmp_path: Path, pki: Path) -> None:
    running, port = await _tls_agent(tmp_path, pki, ca=False)
    try:
        tls = ["--cafile", str(pki / "ca.crt")]
        sub = _sub(port, *tls, "-t", "s/#", "-v", "-C", "1", "-q", "1")
        await _wait_connections(running, 1)
        code, out = await _run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *tls,
                                "-t", "s/1", "-m", "hello", "-q", "1"])  # fmt: skip
        assert code == 0, out
        got, _ = await asyncio.to_thread(sub.communicate, timeout=20)
        assert sub.returncode == 0 and got.strip() == "s/1 hello", got
        # A client that does not trust the CA does not connect (it verifies the server).
        code, out = await _run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port),
                                "--cafile", str(pki / "rogue.crt"), "-t", "s/1", "-m", "x"])  # fmt: skip
        assert code != 0, out
    finally:
        await stop(running)


@needs_clients
async def test_tls_listener_requires_client_certificate(tmp_path: Path, pki: Path) -> None:
    running, port = await _tls_agent(tmp_path, pki, ca=True)
    base = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(pki / "ca.crt"),
            "-t", "c/1", "-m", "m", "-q", "1"]  # fmt: skip
    try:
        code, out = await _run(
            [*base, "--cert", str(pki / "client.crt"), "--key", str(pki / "client.key")]
        )
        assert code == 0, out
        code, out = await _run(base)  # no client certificate
        assert code != 0, out
        code, out = await _run(
            [*base, "--cert", str(pki / "rogue.crt"), "--key", str(pki / "rogue.key")]
        )
        assert code != 0, out
        stats = (await call(running.state_dir, "status"))["mqtt_stats"]
        assert stats["publishes_received"] == 1
    finally:
        await stop(running)


def _load_error(tmp_path: Path, body: str) -> str:
    state_dir = tmp_path / "x"
    state_dir.mkdir(exist_ok=True)
    with pytest.raises(ConfigError) as err:
        make_agent(
            state_dir, "x", "--mqtt", "127.0.0.1:0", "--config", str(_config(tmp_path, body))
        )
    return str(err.value)


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ('tls_listen = "127.0.0.1:0"\ntls_key = "KEY"', "mqtt.tls_cert: required"),
        ('tls_listen = "127.0.0.1:0"\ntls_cert = "/nonexistent.crt"\ntls_key = "KEY"', "mqtt.tls_cert: expected a readable file"),
        ('tls_cert = "CRT"\ntls_key = "KEY"', "mqtt.tls_listen: required"),
        ('tls_listen = "nowhere"\ntls_cert = "CRT"\ntls_key = "KEY"', "mqtt.tls_listen: expected"),
        ('attach = "127.0.0.1:1883"', "mqtt.attach_topics: required"),
        ('attach = "127.0.0.1:1883"\nattach_topics = ["a/# sideways"]', "mqtt.attach_topics: expected each item"),
        ('attach = "127.0.0.1:1883"\nattach_topics = ["$share/g/a in"]', "mqtt.attach_topics: expected"),
        ('attach_topics = ["a/#"]', "mqtt.attach: required"),
    ],
)  # fmt: skip
def test_bad_tls_and_attach_config_names_the_key(
    tmp_path: Path, pki: Path, body: str, names: str
) -> None:
    body = body.replace("CRT", str(pki / "server.crt")).replace("KEY", str(pki / "server.key"))
    assert names in _load_error(tmp_path, "[mqtt]\n" + body)


async def test_unloadable_certificate_is_a_config_error(tmp_path: Path, pki: Path) -> None:
    config = _config(
        tmp_path,
        f"""[mqtt]
tls_listen = "127.0.0.1:0"
tls_cert = "{pki / "server.crt"}"
tls_key = "{pki / "client.key"}"
""",
    )  # fmt: skip  (a key that is not the certificate's)
    state_dir = tmp_path / "b"
    state_dir.mkdir()
    agent = make_agent(state_dir, "b", "--mqtt", "127.0.0.1:0", "--config", str(config))
    with pytest.raises(ConfigError, match="^mqtt.tls_cert / mqtt.tls_key: cannot load"):
        await asyncio.wait_for(agent.run(), TIMEOUT)


def test_attach_topic_syntax() -> None:
    got = check_attach_topic("a/+/c both 2")
    assert (got.topic_filter, got.inbound, got.outbound, got.qos) == ("a/+/c", True, True, 2)
    got = check_attach_topic("x/#")  # mosquitto's defaults: out, QoS 0
    assert (got.inbound, got.outbound, got.qos) == (False, True, 0)


# Attach mode against a real mosquitto.


@contextlib.contextmanager
def _mosquitto(tmp_path: Path, port: int) -> Iterator[int]:
    """A mosquitto on 127.0.0.1:port until the block ends (stopped by its pid)."""
    conf = tmp_path / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        [str(BROKER), "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None:
                raise AssertionError(
                    f"mosquitto exited: {proc.stdout.read() if proc.stdout else ''!r}"
                )
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    with _mosquitto(tmp_path, _free_port()) as port:
        yield port


async def _attach_status(running: Running, want: bool, tries: int = 200) -> dict[str, Any]:
    for _ in range(tries):
        status = await call(running.state_dir, "status")
        if status["mqtt_attach"]["attached"] == want:
            return status  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)
    raise AssertionError(f"attached never became {want}: {status['mqtt_attach']}")


@pytest.fixture
async def attached(tmp_path: Path, mosquitto: int) -> AsyncIterator[tuple[Running, int, int]]:
    config = _config(tmp_path, f"""[mqtt]
attach = "127.0.0.1:{mosquitto}"
attach_topics = ["site/# in 1", "agent/# out 1", "both/# both 1"]
""")  # fmt: skip
    running = await start(tmp_path / "a", "a", ["--mqtt", "127.0.0.1:0", "--config", str(config)])
    try:
        status = await _attach_status(running, True)
        yield running, int(status["mqtt"].rsplit(":", 1)[1]), mosquitto
    finally:
        await stop(running)


async def _pub(port: int, topic: str, message: str) -> None:
    code, out = await _run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
                            "-t", topic, "-m", message])  # fmt: skip
    assert code == 0, out


async def _sub_ready(running: Running, count: int) -> None:
    await _wait_connections(running, count)


def _lines(out: str) -> list[str]:
    return sorted(line for line in out.split("\n") if line and line != "Timed out")


@needs_broker
async def test_attach_in_out_and_no_loop(attached: tuple[Running, int, int]) -> None:
    running, agent, site = attached
    # 1 is the bridge client itself; mosquitto_sub on the agent makes 2. Each subscriber
    # stops at the count it must see exactly: a message looping back would take the place
    # of one that must arrive (and the bridge's in/out counts below would be off).
    on_agent = _sub(
        agent, "-t", "site/#", "-t", "both/#", "-t", "agent/#", "-v", "-q", "1", "-C", "5"
    )
    on_site = _sub(
        site, "-t", "agent/#", "-t", "both/#", "-t", "site/#", "-v", "-q", "1", "-C", "6"
    )
    await _sub_ready(running, 2)
    await asyncio.sleep(0.5)  # on_site's SUBSCRIBE reached mosquitto
    await _pub(site, "site/t", "from-site")  # in
    await _pub(agent, "agent/t", "from-agent")  # out
    await _pub(site, "both/s", "both-from-site")  # in, must not come back to the site
    await _pub(agent, "both/a", "both-from-agent")  # out, must not come back to the agent
    await _pub(agent, "site/x", "stays-local")  # site/# is in only: not sent to the site
    await _pub(site, "agent/x", "stays-site")  # agent/# is out only: not taken in
    big = Path(str(running.state_dir)) / "big"
    big.write_bytes(b"x" * (300 * 1024))  # past the agent's 256 KiB packet bound
    code, out = await _run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(site), "-q", "1",
                            "-t", "site/big", "-f", str(big)])  # fmt: skip
    assert code == 0, out
    got_agent, _ = await asyncio.to_thread(on_agent.communicate, timeout=20)
    got_site, _ = await asyncio.to_thread(on_site.communicate, timeout=20)
    assert "site/big " + "x" * (300 * 1024) in got_site.split("\n")  # the site has it
    got_site = got_site.replace("site/big " + "x" * (300 * 1024) + "\n", "")
    assert _lines(got_agent) == sorted(
        ["site/t from-site", "agent/t from-agent", "both/s both-from-site",
         "both/a both-from-agent", "site/x stays-local"]
    ), got_agent  # fmt: skip
    assert _lines(got_site) == sorted(
        ["site/t from-site", "agent/t from-agent", "both/s both-from-site",
         "both/a both-from-agent", "agent/x stays-site"]
    ), got_site  # fmt: skip
    for _ in range(50):  # the bridge may see the big message just after the site's subscriber
        stats = (await call(running.state_dir, "status"))["mqtt_attach"]
        if stats["in_dropped"]:
            break
        await asyncio.sleep(0.1)
    assert (stats["in"], stats["out"], stats["in_dropped"]) == (2, 2, 1), stats


@needs_broker
async def test_attach_waits_for_an_unreachable_broker_and_reconnects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()  # nothing listens there yet
    config = _config(tmp_path, f"""[mqtt]
attach = "127.0.0.1:{port}"
attach_topics = ["site/# in 1"]
""")  # fmt: skip
    running = await start(tmp_path / "a", "a", ["--mqtt", "127.0.0.1:0", "--config", str(config)])
    try:
        await asyncio.sleep(3.5)  # attempts at 0, ~1, ~3 s: one log line for the outage
        status = await call(running.state_dir, "status")
        assert status["mqtt_attach"]["attached"] is False
        assert status["mqtt_attach"]["connects"] == 0
        agent = int(status["mqtt"].rsplit(":", 1)[1])
        unreachable = [r for r in caplog.records if "broker unreachable" in r.getMessage()]
        assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]
        with _mosquitto(tmp_path, port):
            await _attach_status(running, True, tries=300)  # backoff is at most ~5 s here
            on_agent = _sub(agent, "-t", "site/#", "-v", "-C", "1", "-q", "1")
            await _wait_connections(running, 2)
            await _pub(port, "site/back", "again")
            got, _ = await asyncio.to_thread(on_agent.communicate, timeout=20)
            assert got.strip() == "site/back again", got
        await _attach_status(running, False)  # the broker went: the bridge notices
    finally:
        await stop(running)


def test_aiomqtt_is_not_imported_without_attach() -> None:
    code = "import sys, edgeagent.features.mqtt; print('aiomqtt' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert out.stdout.strip() == "False", out


@needs_broker
async def test_attach_over_tls_with_username_and_password(tmp_path: Path, pki: Path) -> None:
    """The site mosquitto listens on TLS only and refuses anonymous clients: the agent
    attaches with ``attach_tls_ca`` and ``attach_username`` / ``attach_password``, and what
    is published there (also over TLS, with the password) reaches the agent's subscriber."""
    port = _free_port()
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "site-user", "s3cret"],
                   check=True, capture_output=True)  # fmt: skip
    conf = tmp_path / "tls-mosquitto.conf"
    conf.write_text(
        f"user root\nper_listener_settings false\nallow_anonymous false\n"
        f"password_file {passwd}\npersistence false\nlistener {port} 127.0.0.1\n"
        f"cafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\nkeyfile {pki / 'server.key'}\n"
    )
    proc = subprocess.Popen(
        [str(BROKER), "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    site = ["-h", "127.0.0.1", "-p", str(port), "--cafile", str(pki / "ca.crt")]
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        code, out = await _run(["mosquitto_pub", *site, "-t", "site/x", "-m", "anon"])
        assert code != 0, out  # the site broker really wants the password
        config = _config(tmp_path, f"""[mqtt]
attach = "127.0.0.1:{port}"
attach_topics = ["site/# in 1"]
attach_tls_ca = "{pki / "ca.crt"}"
attach_username = "site-user"
attach_password = "s3cret"
""")  # fmt: skip
        running = await start(
            tmp_path / "a", "a", ["--mqtt", "127.0.0.1:0", "--config", str(config)]
        )
        try:
            status = await _attach_status(running, True)
            agent = int(status["mqtt"].rsplit(":", 1)[1])
            on_agent = _sub(agent, "-t", "site/#", "-v", "-C", "1", "-q", "1")
            await _wait_connections(running, 2)
            code, out = await _run(["mosquitto_pub", *site, "-u", "site-user", "-P", "s3cret",
                                    "-q", "1", "-t", "site/t", "-m", "over-tls"])  # fmt: skip
            assert code == 0, out
            got, _ = await asyncio.to_thread(on_agent.communicate, timeout=20)
            assert got.strip() == "site/t over-tls", got
        finally:
            await stop(running)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ('attach_tls_ca = "CA"', "mqtt.attach: required with mqtt.attach_tls_* / attach_username"),
        ('attach = "127.0.0.1:1883"\nattach_topics = ["a/#"]\nattach_tls_cert = "CRT"', "mqtt.attach_tls_key: required"),
        ('attach = "127.0.0.1:1883"\nattach_topics = ["a/#"]\nattach_tls_cert = "CRT"\nattach_tls_key = "KEY"', "mqtt.attach_tls_ca: required"),
        ('attach = "127.0.0.1:1883"\nattach_topics = ["a/#"]\nattach_password = "x"', "mqtt.attach_username: required"),
        ('attach = "127.0.0.1:1883"\nattach_topics = ["a/#"]\nattach_username = ""', "mqtt.attach_username: expected a user name"),
        ('attach = "127.0.0.1:1883"\nattach_topics = ["a/#"]\nattach_tls_ca = "/nonexistent.crt"', "mqtt.attach_tls_ca: expected a readable file"),
    ],
)  # fmt: skip
def test_bad_attach_tls_and_credentials_config_names_the_key(
    tmp_path: Path, pki: Path, body: str, names: str
) -> None:
    body = body.replace("CRT", str(pki / "client.crt")).replace("KEY", str(pki / "client.key"))
    body = body.replace("CA", str(pki / "ca.crt"))
    assert names in _load_error(tmp_path, "[mqtt]\n" + body)


async def test_unloadable_attach_ca_is_a_config_error(tmp_path: Path, pki: Path) -> None:
    config = _config(
        tmp_path,
        f"""[mqtt]
attach = "127.0.0.1:1883"
attach_topics = ["a/#"]
attach_tls_ca = "{pki / "client.key"}"
""",
    )  # fmt: skip  (a key, not a CA certificate)
    state_dir = tmp_path / "c"
    state_dir.mkdir()
    agent = make_agent(state_dir, "c", "--mqtt", "127.0.0.1:0", "--config", str(config))
    with pytest.raises(ConfigError, match="^mqtt.attach_tls_ca: cannot load"):
        await asyncio.wait_for(agent.run(), TIMEOUT)
