// The network tests' world: an "internet" namespace of the test's own on 198.51.100.0/24
// (with a private and a link-local address routed to it through the test's own link), HTTP
// servers there and on the host, and a NetworkHost with a tag and a pool of the test's own.
import Foundation
import FurcateCore
import VMNetwork

#if canImport(Glibc)
    import Glibc
#endif

/// Whether the network tests run (see `facilityAvailable`).
public let networkAvailable = facilityAvailable("network tests", unavailable: NetworkFixture.unavailable)

/// The test's "internet" namespace, a server on the host, and a NetworkHost with a tag and a
/// pool of the test's own.
public final class NetworkFixture {
    /// Runs `body` with a new fixture, torn down afterwards; one at a time in this process
    /// (the test internet's addresses and routes are the host's), waiting without holding a
    /// thread.
    public static func with<R>(pool: IPv4Network? = nil, _ body: (NetworkFixture) async throws -> R) async throws -> R {
        await gate.acquire()
        let f: NetworkFixture
        do { f = try NetworkFixture(pool: pool) } catch {
            await gate.release()
            throw error
        }
        do {
            let r = try await body(f)
            f.tearDown()
            await gate.release()
            return r
        } catch {
            f.tearDown()
            await gate.release()
            throw error
        }
    }

    private static let gate = Gate()

    /// One holder at a time; the others wait in turn.
    private actor Gate {
        private var held = false
        private var waiting: [CheckedContinuation<Void, Never>] = []
        func acquire() async {
            if !held {
                held = true
                return
            }
            await withCheckedContinuation { waiting.append($0) }
        }
        func release() {
            if waiting.isEmpty { held = false } else { waiting.removeFirst().resume() }
        }
    }

    /// Why the network tests cannot run here, or nil.
    public static let unavailable: String? = {
        if geteuid() != 0 { return "network namespaces need root" }
        // Looked up in PATH here, not by running `which`: no process is started while the
        // test runner evaluates its traits.
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin").split(separator: ":")
        for t in ["ip", "nft", "curl", "python3"] where !path.contains(where: { access("\($0)/\(t)", X_OK) == 0 }) {
            return "\(t) is not installed"
        }
        return nil
    }()

    /// The VM networks under test.
    public let host: NetworkHost
    /// Four hex digits in every name the test makes.
    public let tag: String
    /// The "internet" namespace.
    public let inet: String
    /// The host's end of the link to it.
    public let inetLink: String
    /// A port a server of the host listens on (all addresses).
    public let hostPort: Int
    /// Another port, for a server in a VM namespace.
    public let bPort: Int
    private var servers: [Process] = []

    /// - Parameter pool: the VM network pool (default: a free /24 of 10.250.0.0/16).
    init(pool: IPv4Network? = nil) throws {
        tag = String(format: "%04x", (Int(getpid()) ^ 0x5a5a) & 0xffff)
        host = NetworkHost(
            options: try NetworkOptions(
                pool: try pool ?? Self.freePool(), tag: tag, dnsUpstreams: [Self.dnsServer]))
        inet = "fct-\(tag)-inet"
        inetLink = "fct\(tag)i"
        hostPort = 20000 + Int(getpid() % 20000)
        bPort = hostPort + 1
        do { try build() } catch {
            tearDown()
            throw error
        }
    }

    private func build() throws {
        try sh("ip netns add \(inet)")
        try sh("ip link add \(inetLink) type veth peer name eth0 netns \(inet)")
        try sh("ip addr add 198.51.100.1/24 dev \(inetLink) && ip link set \(inetLink) up")
        try sh("sysctl -qw net.ipv4.conf.\(inetLink).forwarding=1 net.ipv6.conf.\(inetLink).disable_ipv6=1")
        try sh(
            "ip -n \(inet) addr add 198.51.100.10/24 dev eth0 && ip -n \(inet) addr add 192.168.77.10/32 dev eth0"
                + " && ip -n \(inet) addr add 169.254.169.254/32 dev eth0 && ip -n \(inet) link set eth0 up"
                + " && ip -n \(inet) link set lo up && ip -n \(inet) route add default via 198.51.100.1")
        // Routes of the test's own, through its own link, so that only the policy stands
        // between a VM and these two.
        try sh("ip route replace 192.168.77.10/32 via 198.51.100.10 dev \(inetLink)")
        try sh("ip route replace 169.254.169.254/32 via 198.51.100.10 dev \(inetLink)")
        for port in [8000, 8001] {
            try serve([
                "nsenter", "--net=/run/netns/\(inet)", "python3", "-c", Self.server, "0.0.0.0", "\(port)",
                "inet-\(port)",
            ])
        }
        try serve(["python3", "-c", Self.server, "0.0.0.0", "\(hostPort)", "host"])
        try startDNS()
    }

    /// The test internet's DNS server (the VM networks' upstream): `Self.zone`'s names.
    public static let dnsServer = DNSServer(IPv4Address(0xc633_640a))  // 198.51.100.10

    /// The test internet's names: two public, one that points at a private address.
    public static let zone = [
        "allowed.test": "198.51.100.10", "www.allowed.test": "198.51.100.10", "other.test": "198.51.100.10",
        "private.allowed.test": "192.168.77.10",
    ]

    /// A DNS server of the test internet's on 198.51.100.10:53: `zone`'s A records (TTL 1 s),
    /// no records of other types, NXDOMAIN for other names.
    static let dnsServerScript = #"""
        import json, socket, struct, sys, os
        zone = json.loads(sys.argv[1])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("198.51.100.10", 53))
        open(sys.argv[2], "w").close()
        while True:
            q, peer = s.recvfrom(4096)
            i, labels = 12, []
            while q[i]:
                labels.append(q[i + 1:i + 1 + q[i]].decode().lower()); i += 1 + q[i]
            name, qtype, end = ".".join(labels), struct.unpack(">H", q[i + 1:i + 3])[0], i + 5
            known = name in zone
            head = q[:2] + bytes([0x84 | (q[2] & 1), 0x80 if known else 0x83]) + b"\0\1"
            ans = b""
            if known and qtype == 1:
                ans = b"\xc0\x0c\0\1\0\1" + struct.pack(">IH", 1, 4) + socket.inet_aton(zone[name])
            s.sendto(head + struct.pack(">HHH", 1 if ans else 0, 0, 0) + q[12:end] + ans, peer)
        """#

    private func startDNS() throws {
        let ready = NSTemporaryDirectory() + "fct-\(tag)-dns-ready"
        unlink(ready)
        let zone = String(decoding: try JSONSerialization.data(withJSONObject: Self.zone), as: UTF8.self)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["nsenter", "--net=/run/netns/\(inet)", "python3", "-c", Self.dnsServerScript, zone, ready]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.runWithSignalsUnblocked()
        servers.append(p)
        for _ in 0..<50 {
            if unlink(ready) == 0 { return }
            usleep(100_000)
        }
        throw FurcateError(.timedOut, "the test DNS server did not start")
    }

    /// An unused /24 of 10.0.0.0/8 for the pool (none of the host's networks overlaps it).
    public static func freePool() throws -> IPv4Network {
        let out = try runCommand(["ip", "-o", "-4", "route", "show", "table", "all"]).output
        let used = out.split(separator: "\n").compactMap { line -> IPv4Network? in
            guard let first = line.split(separator: " ").first(where: { $0.first?.isNumber == true }) else {
                return nil
            }
            return try? IPv4Network(parsing: String(first))
        }
        for third in (Int(getpid()) % 200)..<256 {
            let n = try IPv4Network(parsing: "10.250.\(third).0/24")
            if !used.contains(where: { $0.overlaps(n) && $0.prefix > 0 }) { return n }
        }
        throw FurcateError(.exists, "no free /24 in 10.250.0.0/16 for the test pool")
    }

    /// A global IPv4 address of the host itself (not one of the test's links), if any.
    public var hostGlobalAddress: String? {
        let out = (try? runCommand(["ip", "-o", "-4", "addr", "show", "scope", "global"]).output) ?? ""
        for line in out.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count > 3, !f[1].hasPrefix("fc"), let a = f[3].split(separator: "/").first else { continue }
            return String(a)
        }
        return nil
    }

    /// What `http://target/` answers from inside `p`'s namespace; nil when it cannot be reached
    /// within 3 s (a dropped connection; one that connects has 15 s to answer on a loaded host).
    public func get(from p: VMNetworkPlan, _ target: String) -> String? {
        guard
            let r = try? runCommand([
                "nsenter", "--net=/run/netns/\(p.namespace)", "curl", "-s", "--connect-timeout", "3", "-m", "15",
                "http://\(target)/",
            ]), r.status == 0
        else { return nil }
        return r.output.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// What the resolver of `p`'s guests answers for `name` (asked from inside its namespace):
    /// the response code and the IPv4 addresses; nil when nothing answers within 3 s.
    public func resolve(from p: VMNetworkPlan, _ name: String) -> (code: Int, addresses: [String])? {
        guard
            let r = try? runCommand([
                "nsenter", "--net=/run/netns/\(p.namespace)", "python3", "-c", Self.dnsClientScript,
                "\(GuestAddressing.resolver)", name,
            ]), r.status == 0
        else { return nil }
        let words = r.output.split(whereSeparator: \.isWhitespace).map(String.init)
        guard let code = words.first.flatMap({ Int($0) }) else { return nil }
        return (code, Array(words.dropFirst()))
    }

    /// Asks argv[1]:53 for argv[2]'s A records; prints the response code and the addresses.
    static let dnsClientScript = #"""
        import socket, struct, sys
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
        q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"".join(
            bytes([len(l)]) + l.encode() for l in sys.argv[2].split(".")) + b"\x00\x00\x01\x00\x01"
        s.sendto(q, (sys.argv[1], 53))
        r = s.recv(4096)
        i, out = len(q), [str(r[3] & 15)]
        for _ in range(struct.unpack(">H", r[6:8])[0]):
            while r[i] and r[i] < 192: i += 1 + r[i]
            i += 2 if r[i] >= 192 else 1
            t, _, _, n = struct.unpack(">HHIH", r[i:i + 10]); i += 10
            if t == 1: out.append(socket.inet_ntoa(r[i:i + 4]))
            i += n
        print(" ".join(out))
        """#

    /// A one-line HTTP server: answers every GET with its third argument.
    static let server = """
        import http.server, sys
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                b = sys.argv[3].encode()
                self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
            def log_message(self, *a): pass
        http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
        """

    /// Starts a test server (in a namespace through `nsenter --net` only: `ip netns exec` would
    /// give it a copy of every mount of the host's, and other tests' FUSE mounts could then not
    /// be unmounted while it runs).
    private func serve(_ argv: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = argv
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.runWithSignalsUnblocked()  // else it inherits a mask that blocks SIGTERM
        servers.append(p)
        // Listening once a connection is accepted.
        let port = argv[argv.count - 2]
        let inNS = argv.first == "nsenter" ? ["nsenter", "--net=/run/netns/\(inet)"] : []
        for _ in 0..<50 {
            if (try? runCommand(inNS + ["curl", "-s", "-m", "1", "http://127.0.0.1:\(port)/"]))?.status == 0 { return }
            usleep(100_000)
        }
        throw FurcateError(.timedOut, "the test server on port \(port) did not start")
    }

    private func sh(_ command: String) throws {
        let r = try runCommand(["sh", "-c", command])
        guard r.status == 0 else { throw FurcateError(.io, "\(command): \(r.output)") }
    }

    /// Ends the servers and removes everything of the test's and of its NetworkHost's.
    func tearDown() {
        for p in servers {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
        }
        _ = try? host.removeLeftovers(keeping: [])
        try? host.removeTable()
        _ = try? runCommand(["ip", "route", "del", "192.168.77.10/32"])
        _ = try? runCommand(["ip", "route", "del", "169.254.169.254/32"])
        _ = try? runCommand(["ip", "netns", "del", inet])
        _ = try? runCommand(["ip", "link", "del", inetLink])
    }
}
