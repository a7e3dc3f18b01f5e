// NetworkHost — one network namespace per VM, joined to the host by a veth pair with its own
// /30 of the pool, the guest behind a tap device inside at the same fixed address in every VM
// (so a fork keeps its parent's configuration), NAT in the namespace and on the host, and the
// policy in an nftables table of this host's own (docs/ARCHITECTURE.md, "Guest networking").
//
//   guest 10.0.2.15 ── tap0 10.0.2.2 (+ .3 DNS) ┐ namespace fc-TAG-N: masquerade out of uplink
//                          uplink 10.231.x.2/30 ┘
//                               │ veth
//                     fcTAG-N 10.231.x.1/30   host: table inet furcate-TAG (policy per VM,
//                               │              masquerade out of the host)
//                            the host's routes
import Foundation
import FurcateCore

/// Settings of a host's VM networks.
public struct NetworkOptions: Sendable {
    /// The addresses the host ends and namespaces of the veth pairs are taken from, a /30 per
    /// VM. It must not overlap a network the host uses.
    public var pool: IPv4Network
    /// Four lowercase hex digits in every name this host's networks use (namespaces, links,
    /// the nftables table), so that servers over different data directories do not meet.
    public var tag: String
    /// The DNS servers the guests' resolver asks (default: those of /etc/resolv.conf).
    public var dnsUpstreams: [DNSServer]

    /// - Throws: `.invalidArgument` for a pool smaller than one /30 or a tag that is not four
    ///   lowercase hex digits.
    public init(pool: IPv4Network, tag: String, dnsUpstreams: [DNSServer]? = nil) throws {
        guard pool.prefix <= 30 else {
            throw FurcateError(.invalidArgument, "the VM network pool \(pool) is smaller than one /30")
        }
        guard tag.count == 4, tag.allSatisfy({ $0.isHexDigit && !$0.isUppercase }) else {
            throw FurcateError(.invalidArgument, "a network tag is four lowercase hex digits, not '\(tag)'")
        }
        self.pool = pool
        self.tag = tag
        self.dnsUpstreams = dnsUpstreams ?? DNSServer.fromResolvConf()
    }

    /// The tag of a data directory: its path hashed (FNV-1a) to four hex digits.
    public static func tag(for dataDirectory: String) -> String {
        var h: UInt32 = 2_166_136_261
        for b in dataDirectory.utf8 {
            h ^= UInt32(b)
            h = h &* 16_777_619
        }
        let t = String(h & 0xffff, radix: 16)
        return String(repeating: "0", count: 4 - t.count) + t
    }
}

/// The addresses every guest has: the same in every VM, its namespace keeping it apart.
public enum GuestAddressing {
    /// The guest's own address.
    public static let guest = IPv4Address(0x0a00_020f)  // 10.0.2.15
    /// Its gateway: the namespace's end of the tap device.
    public static let gateway = IPv4Address(0x0a00_0202)  // 10.0.2.2
    /// Its DNS resolver, served in the namespace.
    public static let resolver = IPv4Address(0x0a00_0203)  // 10.0.2.3
    /// Prefix length of the guest's network.
    public static let prefix = 24
    /// The gateway's MAC address (locally administered), the same in every namespace.
    public static let gatewayMAC = "02:66:63:00:00:02"
    /// The tap device QEMU opens in the namespace.
    public static let tap = "tap0"
    /// The namespace's end of the veth pair.
    public static let uplink = "uplink"
}

/// The names and addresses of one VM's network (the `index`-th /30 of the pool).
public struct VMNetworkPlan: Sendable, Equatable {
    /// Its place in the pool.
    public let index: Int
    /// The network namespace (in /run/netns).
    public let namespace: String
    /// The host's end of the veth pair.
    public let hostLink: String
    /// The host end's address.
    public let hostAddress: IPv4Address
    /// The namespace end's address (what the host sees the guest's connections come from).
    public let namespaceAddress: IPv4Address
    /// The per-VM chain in the host's table.
    public var chain: String { "vm-\(index)" }
    /// The nftables set of the addresses its resolver answered for allowed names.
    public var nameSet: String { "names-\(index)" }
}

/// The VM networks of one host (one data directory): made, changed and removed with `ip` and
/// `nft`. Needs root. Every name it makes carries its tag, and it removes only those.
public struct NetworkHost: Sendable {
    /// The settings.
    public let options: NetworkOptions

    /// The guests' DNS resolver (one listener per VM network this process serves).
    public let resolver: GuestResolver

    /// - Parameter options: pool, tag and DNS servers.
    public init(options: NetworkOptions) {
        self.options = options
        resolver = GuestResolver(upstreams: options.dnsUpstreams, table: "furcate-\(options.tag)")
    }

    /// The host's nftables table.
    public var table: String { "furcate-\(options.tag)" }
    /// The prefix of every namespace's name.
    public var namespacePrefix: String { "fc-\(options.tag)-" }
    /// The prefix of every host link's name.
    public var linkPrefix: String { "fc\(options.tag)-" }
    /// VMs the pool has room for.
    public var capacity: Int { Int(min(options.pool.size / 4, 100_000)) }

    /// The plan of the `index`-th VM network.
    /// - Throws: `.invalidArgument` past the pool's end.
    public func plan(_ index: Int) throws -> VMNetworkPlan {
        guard index >= 0, index < capacity, let host = options.pool.address(at: UInt64(index) * 4 + 1),
            let ns = options.pool.address(at: UInt64(index) * 4 + 2)
        else {
            throw FurcateError(
                .invalidArgument, "VM network \(index) is past the end of the pool \(options.pool) (\(capacity) VMs)")
        }
        return VMNetworkPlan(
            index: index, namespace: namespacePrefix + "\(index)", hostLink: linkPrefix + "\(index)",
            hostAddress: host, namespaceAddress: ns)
    }

    /// Checks that this host can make VM networks: root, the tools, and a pool that overlaps
    /// none of the host's routes or addresses.
    /// - Throws: `.notPermitted` without root, `.notFound` for a missing tool, `.exists` for
    ///   an overlap (naming the host's network).
    public func checkHost() throws {
        guard geteuid() == 0 else {
            throw FurcateError(.notPermitted, "VM networks need root (network namespaces, veth pairs, nftables)")
        }
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin").split(
            separator: ":")
        for (tool, package) in [
            ("ip", "iproute2"), ("nft", "nftables"), ("nsenter", "util-linux"), ("sysctl", "procps"),
        ]
        where !path.contains(where: { access("\($0)/\(tool)", X_OK) == 0 }) {
            throw FurcateError(.notFound, "VM networks need \(tool) (install \(package))")
        }
        let routes = try ip(["-o", "-4", "route", "show", "table", "all"]) + (try ip(["-o", "-4", "addr", "show"]))
        for line in routes.split(separator: "\n") {
            let words = line.split(separator: " ")
            // A route's destination is its first word; an address follows "inet".
            let candidates = [words.first] + (words.firstIndex(of: "inet").map { [words[safe: $0 + 1]] } ?? [])
            for w in candidates.compactMap({ $0 }) {
                guard w.first?.isNumber == true, let n = try? IPv4Network(parsing: Self.networkOf(String(w))),
                    n.prefix > 0, n.overlaps(options.pool)
                else { continue }
                // Our own links' routes (a previous server's) are ours to reuse.
                if line.contains(" \(linkPrefix)") || line.contains(": \(linkPrefix)") { continue }
                throw FurcateError(
                    .exists,
                    "the VM network pool \(options.pool) overlaps the host's network \(n) (\(line.prefix(120))); choose another with --vm-network"
                )
            }
        }
    }

    /// "10.1.2.3/16" → "10.1.0.0/16" (an address with its prefix, as `ip addr` prints it).
    static func networkOf(_ text: String) -> String {
        let parts = text.split(separator: "/")
        guard parts.count == 2, let a = IPv4Address(parts[0]), let p = Int(parts[1]), (0...32).contains(p) else {
            return text
        }
        return "\(IPv4Address(a.value & IPv4Network.mask(p)))/\(p)"
    }

    // MARK: the host's table

    /// Makes the host's table anew (an old one of the same tag, a dead server's, goes with
    /// its per-VM chains: `attach` or `restore` puts back those of VMs that live on).
    /// - Throws: `.notFound` without nft, `.io` when nft refuses.
    public func prepare() throws {
        try nft(
            (try tableExists() ? "delete table inet \(table)\n" : "") + HostRules.baseTable(self))
    }

    /// Removes the host's table (after the last VM network is gone).
    public func removeTable() throws {
        if try tableExists() { try nft("delete table inet \(table)\n") }
    }

    func tableExists() throws -> Bool {
        let out = try HostTool.run("nft", ["list", "tables"], package: "nftables")
        return out.split(separator: "\n").contains { $0 == "table inet \(table)" }
    }

    // MARK: one VM's network

    /// Makes the `index`-th VM network with `policy`: namespace, veth pair, tap device,
    /// addresses, routes, NAT and the policy's chain. On failure nothing of it is left.
    /// - Throws: `.invalidArgument` for an index past the pool, `.exists` when its namespace
    ///   exists, `.io` when a tool fails.
    @discardableResult
    public func attach(_ index: Int, policy: EgressPolicy) throws -> VMNetworkPlan {
        try policy.validate()
        let p = try plan(index)
        if namespaceExists(p) {
            throw FurcateError(.exists, "the network namespace \(p.namespace) exists already")
        }
        do {
            try ip(["netns", "add", p.namespace])
            try ip([
                "link", "add", p.hostLink, "type", "veth", "peer", "name", GuestAddressing.uplink, "netns", p.namespace,
            ])
            try sysctl(["net.ipv6.conf.\(p.hostLink).disable_ipv6=1", "net.ipv4.conf.\(p.hostLink).forwarding=1"])
            try ip(["addr", "add", "\(p.hostAddress)/30", "dev", p.hostLink])
            try ip(["link", "set", p.hostLink, "up"])
            try inNamespace(
                p, "sysctl",
                [
                    "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
                    "net.ipv4.ip_forward=1",
                ])
            try ip(["-n", p.namespace, "link", "set", "lo", "up"])
            try ip(["-n", p.namespace, "addr", "add", "\(p.namespaceAddress)/30", "dev", GuestAddressing.uplink])
            try ip(["-n", p.namespace, "link", "set", GuestAddressing.uplink, "up"])
            try ip(["-n", p.namespace, "route", "add", "default", "via", "\(p.hostAddress)"])
            try ip(["-n", p.namespace, "tuntap", "add", "dev", GuestAddressing.tap, "mode", "tap", "vnet_hdr"])
            try ip([
                "-n", p.namespace, "addr", "add", "\(GuestAddressing.gateway)/\(GuestAddressing.prefix)", "dev",
                GuestAddressing.tap,
            ])
            try ip(["-n", p.namespace, "addr", "add", "\(GuestAddressing.resolver)/32", "dev", GuestAddressing.tap])
            // One MAC address for every gateway: a fork's guest keeps its parent's ARP cache.
            try ip(["-n", p.namespace, "link", "set", GuestAddressing.tap, "address", GuestAddressing.gatewayMAC])
            try ip(["-n", p.namespace, "link", "set", GuestAddressing.tap, "up"])
            try inNamespace(p, "nft", ["-f", "-"], input: HostRules.namespaceTable())
            try nft(HostRules.vmChain(p, policy: policy, host: self) + HostRules.vmJump(p, host: self))
            try resolver.listen(p, policy: policy)
        } catch {
            resolver.close(index)
            try? removeNamespace(p)
            try? nft(HostRules.removeVM(p, host: self))
            throw error
        }
        return p
    }

    /// Puts back the policy chain of a VM network whose namespace outlived a server (its
    /// namespace, links and tap are there; the table was made anew by `prepare`).
    public func restore(_ index: Int, policy: EgressPolicy) throws {
        try policy.validate()
        let p = try plan(index)
        try nft(HostRules.vmChain(p, policy: policy, host: self) + HostRules.vmJump(p, host: self))
        try resolver.listen(p, policy: policy)
    }

    /// Replaces the policy of a VM network, at once and atomically (one nft transaction; the
    /// addresses of names allowed before go with it when the allowed names change).
    public func setPolicy(_ index: Int, policy: EgressPolicy) throws {
        try policy.validate()
        let p = try plan(index)
        let namesChanged = resolver.policy(index)?.allowedDomains != policy.allowedDomains
        try nft(
            "flush chain inet \(table) \(p.chain)\n" + HostRules.vmRules(p, policy: policy, host: self)
                + (namesChanged ? "flush set inet \(table) \(p.nameSet)\n" : ""))
        if resolver.isListening(index) {
            resolver.setPolicy(index, policy)
        } else {
            try resolver.listen(p, policy: policy)
        }
    }

    /// Removes a VM network: its namespace (which takes the veth pair and tap with it) and
    /// its chain. Not an error when it is gone already.
    public func detach(_ index: Int) throws {
        let p = try plan(index)
        resolver.close(index)
        try removeNamespace(p)
        if try tableExists() { try nft(HostRules.removeVM(p, host: self)) }
    }

    /// Removes the VM networks of this tag whose index is not in `keeping` (a dead server's):
    /// namespaces, host links and chains. Returns the indexes removed.
    @discardableResult
    public func removeLeftovers(keeping: Set<Int>) throws -> [Int] {
        var found = Set<Int>()
        for n in try namespaces() {
            if let i = Int(n.dropFirst(namespacePrefix.count)) { found.insert(i) }
        }
        for l in try hostLinks() { if let i = Int(l.dropFirst(linkPrefix.count)) { found.insert(i) } }
        let gone = found.subtracting(keeping).sorted()
        for i in gone {
            let p = try plan(i)
            resolver.close(i)
            try removeNamespace(p)
            if try hostLinks().contains(p.hostLink) { try ip(["link", "del", p.hostLink]) }
            if try tableExists() { try? nft(HostRules.removeVM(p, host: self)) }
        }
        return gone
    }

    /// The network namespaces of this tag.
    public func namespaces() throws -> [String] {
        try ip(["netns", "list"]).split(separator: "\n").compactMap { line in
            line.split(separator: " ").first.map(String.init)
        }.filter { $0.hasPrefix(namespacePrefix) }
    }

    /// The host links of this tag.
    public func hostLinks() throws -> [String] {
        try ip(["-o", "link", "show"]).split(separator: "\n").compactMap { line -> String? in
            // "7: fcab12-3@if2: <BROADCAST,…"
            let fields = line.split(separator: " ")
            guard fields.count > 1 else { return nil }
            let name = fields[1].split(separator: "@").first.map(String.init) ?? ""
            let bare = name.hasSuffix(":") ? String(name.dropLast()) : name
            return bare.hasPrefix(linkPrefix) ? bare : nil
        }
    }

    /// Whether the plan's namespace exists (its file in /run/netns: no process started, as
    /// a launch asks on the restore path).
    public func namespaceExists(_ p: VMNetworkPlan) -> Bool {
        FileManager.default.fileExists(atPath: "/run/netns/" + p.namespace)
    }

    private func removeNamespace(_ p: VMNetworkPlan) throws {
        guard namespaceExists(p) else { return }
        try ip(["netns", "del", p.namespace])
    }

    // MARK: tools

    @discardableResult
    private func ip(_ args: [String]) throws -> String { try HostTool.run("ip", args, package: "iproute2") }

    private func nft(_ ruleset: String) throws {
        try HostTool.run("nft", ["-f", "-"], input: ruleset, package: "nftables")
    }

    private func sysctl(_ settings: [String]) throws {
        try HostTool.run("sysctl", ["-qw"] + settings, package: "procps")
    }

    @discardableResult
    private func inNamespace(_ p: VMNetworkPlan, _ tool: String, _ args: [String], input: String? = nil) throws
        -> String
    {
        try HostTool.run("ip", ["netns", "exec", p.namespace, tool] + args, input: input, package: "iproute2")
    }
}
