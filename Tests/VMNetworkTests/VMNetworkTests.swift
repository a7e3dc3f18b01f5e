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

@Suite struct DNSMessageTests {
    @Test func aQueryIsReadAndRefusedWithItsQuestion() throws {
        let m = DNSMessage.makeQuery(id: 0xbeef, name: "WWW.Example.test")
        let q = try #require(DNSMessage.query(m))
        #expect(q.id == 0xbeef && q.question == DNSQuestion(name: "www.example.test", type: 1, qclass: 1))
        #expect(q.questionEnd == m.count)
        let r = DNSMessage.refusal(m, q, code: .refused)
        #expect(r.count == m.count && r[0] == 0xbe && r[1] == 0xef && r[2] & 0x80 != 0)
        #expect(DNSMessage.responseCode(r) == 5 && DNSMessage.query(r) == nil, "a response is no query")
    }

    @Test func malformedQueriesAreDropped() {
        let good = DNSMessage.makeQuery(id: 1, name: "a.test")
        var twoQuestions = good
        twoQuestions[5] = 2
        var loop = Array(good[0..<12]) + [0xc0, 12, 0, 1, 0, 1]  // a pointer to itself
        loop[5] = 1
        let dotted = Array(good[0..<12]) + [3, 0x61, 0x2e, 0x62, 4] + Array("test".utf8) + [0, 0, 1, 0, 1]
        let long =
            Array(good[0..<12])
            + Array(repeating: [63] + Array(repeating: UInt8(0x61), count: 63), count: 5)
            .flatMap { $0 } + [0, 0, 1, 0, 1]
        for (why, m) in [
            ("short", Array(good[0..<11])), ("truncated question", Array(good.dropLast(2))),
            ("two questions", twoQuestions), ("pointer loop", loop), ("a dot in a label", dotted),
            ("longer than 255", long), ("bad label type", Array(good[0..<12]) + [0x80, 0, 0, 1, 0, 1]),
        ] {
            #expect(DNSMessage.query(m) == nil, "\(why)")
        }
    }

    @Test func anAnswersAddressesAreReadThroughCompressedNames() throws {
        let m = DNSMessage.makeQuery(id: 7, name: "a.test")
        let q = try #require(DNSMessage.query(m))
        let r = DNSMessage.answer(
            m, q, addresses: [IPv4Address("198.51.100.10")!, IPv4Address("203.0.113.5")!], ttl: 30)
        #expect(
            DNSMessage.addresses(in: r, answering: q)
                == [
                    DNSAddress(address: IPv4Address("198.51.100.10")!, ttl: 30),
                    DNSAddress(address: IPv4Address("203.0.113.5")!, ttl: 30),
                ])
        // Another ID, another question, or records cut short: not an answer to this query.
        var other = r
        other[1] = 8
        #expect(DNSMessage.addresses(in: other, answering: q) == nil)
        let q2 = try #require(DNSMessage.query(DNSMessage.makeQuery(id: 7, name: "b.test")))
        #expect(DNSMessage.addresses(in: r, answering: q2) == nil)
        #expect(DNSMessage.addresses(in: Array(r.dropLast(3)), answering: q) == nil)
    }

    @Test func aPolicyResolvesItsNamesAndTheirSubdomainsOnly() throws {
        let p = EgressPolicy(allowPublic: false, allowedDomains: ["example.test"])
        #expect(p.resolves("example.test") && p.resolves("a.b.example.test"))
        #expect(!p.resolves("badexample.test") && !p.resolves("test") && !p.resolves("example.test.evil"))
        #expect(EgressPolicy.allowPublicInternet.resolves("anything.test"))
        #expect(!EgressPolicy.denyAll.resolves("anything.test"))
        #expect(try EgressPolicy.normalizedDomain("*.Example.TEST.") == "example.test")
        for bad in ["test", "a..b", "-a.b", "a b.c", "*.", "ex*.test"] {
            #expect(throws: FurcateError.self, "\(bad)") { try EgressPolicy.normalizedDomain(bad) }
        }
        #expect(throws: FurcateError.self) { try EgressPolicy(allowedDomains: ["Upper.test"]).validate() }
        // A policy recorded before domain allow-lists decodes without them.
        let old = try JSONDecoder().decode(
            EgressPolicy.self, from: Data(#"{"allowPublic":false,"allowedNetworks":["10.1.0.0/16"]}"#.utf8))
        #expect(old.allowedDomains.isEmpty && old.allowedNetworks.count == 1)
        // The names' addresses are let through after the default blocks, not before.
        let h = NetworkHost(options: try NetworkOptions(pool: IPv4Network(parsing: "10.231.0.0/16"), tag: "ab12"))
        let rules = HostRules.vmRules(try h.plan(2), policy: p, host: h).split(separator: "\n")
        #expect(rules.count == 3 && rules[0].hasSuffix("drop") && rules[1].hasSuffix("ip daddr @names-2 accept"))
        #expect(try DNSServer(parsing: "198.51.100.10:5353") == DNSServer(IPv4Address("198.51.100.10")!, port: 5353))
        #expect(throws: FurcateError.self) { try DNSServer(parsing: "example.test") }
    }
}

/// Real namespaces, veth pairs, taps and nftables. The checks run from inside a VM's namespace
/// (the guest side comes with QEMU in the VM tests); the "internet" is a namespace of the
/// test's own on 198.51.100.0/24, with a private and a link-local address routed to it.
@Suite(.enabled(if: networkAvailable, "needs root, ip, nft, curl and python3"), .serialized)
struct NetworkHostTests {
    @Test(.timeLimit(.minutes(10))) func isolationAndPolicyAreEnforcedAndNothingIsLeft() async throws {
        try await NetworkFixture.with { f in try Self.isolationAndPolicy(f) }
    }

    static func isolationAndPolicy(_ f: NetworkFixture) throws {
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

        // The guests' resolver: any name while public addresses are open; with a name
        // allow-list, those names only, and their public addresses open once resolved.
        try h.setPolicy(0, policy: .allowPublicInternet)
        #expect(try #require(f.resolve(from: a, "other.test")) == (0, ["198.51.100.10"]))
        #expect(try #require(f.resolve(from: a, "missing.test")).code == 3)
        try h.setPolicy(0, policy: EgressPolicy(allowPublic: false, allowedDomains: ["allowed.test"]))
        #expect(f.get(from: a, "198.51.100.10:8000") == nil, "not resolved yet")
        #expect(try #require(f.resolve(from: a, "other.test")) == (5, []), "refused")
        #expect(try #require(f.resolve(from: a, "www.allowed.test")) == (0, ["198.51.100.10"]))
        #expect(f.get(from: a, "198.51.100.10:8000") == "inet-8000")
        #expect(f.get(from: b, "198.51.100.10:8000") == "inet-8000", "b's own policy")
        #expect(try #require(f.resolve(from: a, "private.allowed.test")) == (0, ["192.168.77.10"]))
        #expect(f.get(from: a, "192.168.77.10:8000") == nil, "a name opens no private address")
        try h.setPolicy(0, policy: EgressPolicy(allowPublic: false, allowedDomains: ["elsewhere.test"]))
        #expect(f.get(from: a, "198.51.100.10:8000") == nil, "the old names' addresses went with them")

        // A dead server's leftovers: a kept index stays, the others go (namespace, link, chain).
        try h.prepare()  // a new server's table: chains come back only for the VMs it keeps
        try h.restore(1, policy: .allowPublicInternet)
        #expect(try h.removeLeftovers(keeping: [1]) == [0])
        #expect(try h.namespaces() == [b.namespace])
        #expect(f.get(from: b, "198.51.100.10:8000") == "inet-8000")
        #expect(f.resolve(from: b, "other.test")?.code == 0, "a restored network is served again")
        try h.detach(1)
        try h.detach(1)  // gone already: not an error
        #expect(try h.namespaces().isEmpty && h.hostLinks().isEmpty)
        try h.removeTable()
        #expect(!(try h.tableExists()))
    }
}
