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
