import Foundation
import FurcateCore
import FurcateTestSupport
import Testing

@testable import VMNetwork

#if canImport(Glibc)
    import Glibc
#endif

@Suite struct AddressTests {
    @Test func parsesAndPrintsAddressesAndNetworks() throws {
        #expect(IPv4Address("203.0.113.7")?.description == "203.0.113.7")
        for bad in ["", "1.2.3", "1.2.3.4.5", "256.1.1.1", "01.2.3.4", "1.2.3.-4", "a.b.c.d", "1..2.3", "１.2.3.4"] {
            #expect(IPv4Address(bad) == nil, "\(bad)")
        }
        let n = try IPv4Network(parsing: "10.231.0.0/16")
        #expect(
            n.size == 65536 && n.contains(IPv4Address("10.231.255.255")!) && !n.contains(IPv4Address("10.232.0.0")!))
        #expect(try IPv4Network(parsing: "198.51.100.9").prefix == 32)
        for bad in ["10.0.0.1/24", "10.0.0.0/33", "10.0.0.0/", "10.0.0.0/x", "10.0.0.0/24/1", "nope"] {
            #expect(throws: FurcateError.self, "\(bad)") { try IPv4Network(parsing: bad) }
        }
        #expect(try IPv4Network(parsing: "10.0.0.0/8").overlaps(IPv4Network(parsing: "10.231.0.0/16")))
        #expect(!(try IPv4Network(parsing: "10.0.0.0/8").overlaps(IPv4Network(parsing: "11.0.0.0/8"))))
    }

    @Test func plansTakeTheirOwnSlashThirtyAndNamesFitALinkName() throws {
        let h = NetworkHost(options: try NetworkOptions(pool: IPv4Network(parsing: "10.231.0.0/16"), tag: "ab12"))
        #expect(h.capacity == 16384)
        let p = try h.plan(16383)
        #expect(p.hostAddress.description == "10.231.255.253" && p.namespaceAddress.description == "10.231.255.254")
        #expect(p.hostLink.utf8.count <= 15, "IFNAMSIZ")
        #expect(throws: FurcateError.self) { try h.plan(16384) }
        #expect(throws: FurcateError.self) {
            try NetworkOptions(pool: IPv4Network(parsing: "10.0.0.0/31"), tag: "ab12")
        }
        #expect(throws: FurcateError.self) {
            try NetworkOptions(pool: IPv4Network(parsing: "10.0.0.0/24"), tag: "AB12")
        }
        #expect(NetworkOptions.tag(for: "/var/lib/furcate").count == 4)
    }

    @Test func aPolicyRendersAllowedNetworksBeforeTheBlocksAndDropsTheRest() throws {
        let h = NetworkHost(options: try NetworkOptions(pool: IPv4Network(parsing: "10.231.0.0/16"), tag: "ab12"))
        let p = try h.plan(3)
        let allowed = try IPv4Network(parsing: "10.9.0.0/16")
        let rules = HostRules.vmRules(
            p, policy: EgressPolicy(publicPorts: [443, 80, 443], allowedNetworks: [allowed]), host: h
        ).split(separator: "\n")
        #expect(rules.count == 4)
        #expect(rules[0].hasSuffix("ip daddr { 10.9.0.0/16 } accept"))
        #expect(rules[1].contains("169.254.0.0/16") && rules[1].contains("127.0.0.0/8") && rules[1].hasSuffix("drop"))
        #expect(rules[2].hasSuffix("th dport { 80, 443 } accept"))
        #expect(rules[3].hasSuffix("vm-3 drop"))
        #expect(HostRules.vmRules(p, policy: .denyAll, host: h).split(separator: "\n").count == 2)
        #expect(throws: FurcateError.self) { try EgressPolicy(publicPorts: []).validate() }
    }
}

/// Real namespaces, veth pairs, taps and nftables. The checks run from inside a VM's namespace
/// (the guest side comes with QEMU in the VM tests); the "internet" is a namespace of the
/// test's own on 198.51.100.0/24, with a private and a link-local address routed to it.
@Suite(.enabled(if: networkAvailable, "needs root, ip, nft, curl and python3"), .serialized)
struct NetworkHostTests {
    @Test(.timeLimit(.minutes(3))) func isolationAndPolicyAreEnforcedAndNothingIsLeft() throws {
        let f = try NetworkFixture()
        defer { f.tearDown() }
        let h = f.host
        try h.prepare()
        let a = try h.attach(0, policy: .allowPublicInternet)
        let b = try h.attach(1, policy: .allowPublicInternet)
        #expect(Set(try h.namespaces()) == [a.namespace, b.namespace])
        #expect(Set(try h.hostLinks()) == [a.hostLink, b.hostLink])
        #expect(throws: FurcateError.self) { try h.attach(0, policy: .allowPublicInternet) }

        // The internet: reachable. Everything private, the host and the other VM: not.
        #expect(f.get(from: a, "198.51.100.10:8000") == "inet-8000")
        #expect(f.get(from: a, "127.0.0.1:\(f.hostPort)") == nil, "the namespace's loopback is not the host's")
        #expect(f.get(from: a, "\(a.hostAddress):\(f.hostPort)") == nil, "the host's end of the veth")
        if let own = f.hostGlobalAddress {
            #expect(f.get(from: a, "\(own):\(f.hostPort)") == nil, "the host's own address \(own)")
        }
        #expect(f.get(from: a, "\(b.hostAddress):\(f.hostPort)") == nil, "another VM's host end")
        #expect(f.get(from: a, "\(b.namespaceAddress):\(f.bPort)") == nil, "another VM")
        #expect(f.get(from: a, "169.254.169.254:8000") == nil, "link-local metadata")
        #expect(f.get(from: a, "192.168.77.10:8000") == nil, "a private range")
        #expect(f.get(from: b, "198.51.100.10:8000") == "inet-8000")

        // A named private network opens; link-local stays shut.
        try h.setPolicy(0, policy: EgressPolicy(allowedNetworks: [IPv4Network(parsing: "192.168.77.0/24")]))
        #expect(f.get(from: a, "192.168.77.10:8000") == "inet-8000")
        #expect(f.get(from: a, "169.254.169.254:8000") == nil)
        // Ports: 8000 only.
        try h.setPolicy(0, policy: EgressPolicy(publicPorts: [8000]))
        #expect(f.get(from: a, "198.51.100.10:8000") == "inet-8000")
        #expect(f.get(from: a, "198.51.100.10:8001") == nil)
        // Deny: in effect at once (well within 1 s), for new connections.
        let t0 = ContinuousClock.now
        try h.setPolicy(0, policy: .denyAll)
        #expect(ContinuousClock.now - t0 < .seconds(1))
        #expect(f.get(from: a, "198.51.100.10:8000") == nil)
        #expect(f.get(from: b, "198.51.100.10:8000") == "inet-8000", "the other VM keeps its own policy")

        // A dead server's leftovers: a kept index stays, the others go (namespace, link, chain).
        try h.prepare()  // a new server's table: chains come back only for the VMs it keeps
        try h.restore(1, policy: .allowPublicInternet)
        #expect(try h.removeLeftovers(keeping: [1]) == [0])
        #expect(try h.namespaces() == [b.namespace])
        #expect(f.get(from: b, "198.51.100.10:8000") == "inet-8000")
        try h.detach(1)
        try h.detach(1)  // gone already: not an error
        #expect(try h.namespaces().isEmpty && h.hostLinks().isEmpty)
        try h.removeTable()
        #expect(!(try h.tableExists()))
    }
}

let networkAvailable = facilityAvailable("network tests", unavailable: NetworkFixture.unavailable)

/// The test's "internet" namespace, a server on the host, and a NetworkHost with a tag and a
/// pool of the test's own.
final class NetworkFixture {
    static let unavailable: String? = {
        if geteuid() != 0 { return "network namespaces need root" }
        // Looked up in PATH here, not by running `which`: no process is started while the
        // test runner evaluates its traits.
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin").split(separator: ":")
        for t in ["ip", "nft", "curl", "python3"] where !path.contains(where: { access("\($0)/\(t)", X_OK) == 0 }) {
            return "\(t) is not installed"
        }
        return nil
    }()

    let host: NetworkHost
    let tag: String
    let inet: String
    let inetLink: String
    let hostPort: Int
    let bPort: Int
    private var servers: [Process] = []

    init() throws {
        tag = String(format: "%04x", (Int(getpid()) ^ 0x5a5a) & 0xffff)
        host = NetworkHost(options: try NetworkOptions(pool: try Self.freePool(), tag: tag))
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
            try serve(["ip", "netns", "exec", inet, "python3", "-c", Self.server, "0.0.0.0", "\(port)", "inet-\(port)"])
        }
        try serve(["python3", "-c", Self.server, "0.0.0.0", "\(hostPort)", "host"])
    }

    /// An unused /24 of 10.0.0.0/8 for the pool (none of the host's networks overlaps it).
    static func freePool() throws -> IPv4Network {
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
    var hostGlobalAddress: String? {
        let out = (try? runCommand(["ip", "-o", "-4", "addr", "show", "scope", "global"]).output) ?? ""
        for line in out.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count > 3, !f[1].hasPrefix("fc"), let a = f[3].split(separator: "/").first else { continue }
            return String(a)
        }
        return nil
    }

    /// What `http://target/` answers from inside `p`'s namespace; nil when it cannot be reached
    /// within 2 s.
    func get(from p: VMNetworkPlan, _ target: String) -> String? {
        guard
            let r = try? runCommand([
                "ip", "netns", "exec", p.namespace, "curl", "-s", "--connect-timeout", "2", "-m", "3",
                "http://\(target)/",
            ]), r.status == 0
        else { return nil }
        return r.output.trimmingCharacters(in: .whitespacesAndNewlines)
    }

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
        let inNS = argv.first == "ip" ? ["ip", "netns", "exec", inet] : []
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
