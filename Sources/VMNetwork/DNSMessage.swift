// The little of DNS (RFC 1035) the guest resolver reads and writes: a query's one question,
// the IPv4 answers of a response, and refusals. Every length and pointer is checked: the
// bytes come from a guest or from the network.

/// A DNS message's question.
public struct DNSQuestion: Sendable, Equatable {
    /// The name, lowercased, without the final dot ("" for the root).
    public var name: String
    /// Its QTYPE (1: A, 28: AAAA, …).
    public var type: UInt16
    /// Its QCLASS (1: IN).
    public var qclass: UInt16
}

/// A query as the resolver takes it.
public struct DNSQuery: Sendable, Equatable {
    /// The message ID the answer must carry.
    public var id: UInt16
    /// The one question.
    public var question: DNSQuestion
    /// Where the question ends in the message (the header and question, echoed in refusals).
    public var questionEnd: Int
}

/// One IPv4 address of an answer with its time to live.
public struct DNSAddress: Sendable, Equatable {
    /// The address.
    public var address: IPv4Address
    /// Seconds the answer may be cached.
    public var ttl: UInt32
}

/// Reading and writing DNS messages.
public enum DNSMessage {
    /// Response codes the resolver sends.
    public enum ResponseCode: UInt8, Sendable {
        /// The server failed (no upstream answered).
        case serverFailure = 2
        /// The name does not exist.
        case nameError = 3
        /// The policy does not let this guest resolve the name.
        case refused = 5
    }

    /// A standard query with exactly one question, or nil for anything else (a response, another
    /// opcode, a truncated or malformed message).
    public static func query(_ m: [UInt8]) -> DNSQuery? {
        guard m.count >= 12, m.count <= 4096 else { return nil }
        let flags = UInt16(m[2]) << 8 | UInt16(m[3])
        // QR = 0 (a query), opcode 0 (QUERY), one question.
        guard flags & 0x8000 == 0, (flags >> 11) & 0xf == 0, u16(m, 4) == 1 else { return nil }
        // A label of a dot or an unprintable byte would make the name read here differ from
        // the one an upstream resolves: such names are not asked for.
        guard let (name, end) = name(m, at: 12, strict: true), end + 4 <= m.count else { return nil }
        return DNSQuery(
            id: u16(m, 0), question: DNSQuestion(name: name, type: u16(m, end), qclass: u16(m, end + 2)),
            questionEnd: end + 4)
    }

    /// A query for `name` (type A unless said), as a client sends it.
    public static func makeQuery(id: UInt16, name: String, type: UInt16 = 1) -> [UInt8] {
        var m: [UInt8] = [UInt8(id >> 8), UInt8(id & 0xff), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
        for label in name.split(separator: ".") {
            m.append(UInt8(min(label.utf8.count, 63)))
            m += label.utf8.prefix(63)
        }
        m += [0, UInt8(type >> 8), UInt8(type & 0xff), 0, 1]
        return m
    }

    /// The IPv4 addresses (class IN, type A) of a response to `query`, or nil when `m` is
    /// not a well-formed response to it (another ID or question, truncated records).
    public static func addresses(in m: [UInt8], answering query: DNSQuery) -> [DNSAddress]? {
        guard m.count >= 12, u16(m, 0) == query.id, m[2] & 0x80 != 0, u16(m, 4) == 1 else { return nil }
        guard let (qname, qend) = name(m, at: 12), qend + 4 <= m.count, qname == query.question.name,
            u16(m, qend) == query.question.type
        else { return nil }
        var at = qend + 4
        var found: [DNSAddress] = []
        for _ in 0..<Int(u16(m, 6)) {
            guard let (_, end) = name(m, at: at), end + 10 <= m.count else { return nil }
            let (type, qclass, ttl, length) = (u16(m, end), u16(m, end + 2), u32(m, end + 4), Int(u16(m, end + 8)))
            let data = end + 10
            guard data + length <= m.count else { return nil }
            if type == 1, qclass == 1, length == 4 {
                found.append(DNSAddress(address: IPv4Address(u32(m, data)), ttl: ttl))
            }
            at = data + length
        }
        return found
    }

    /// The response code of a response (its low four bits of flags).
    public static func responseCode(_ m: [UInt8]) -> UInt8? { m.count >= 12 ? m[3] & 0xf : nil }

    /// A response to `query` (its message `m`) with `code` and no records: the header with the
    /// query's ID and recursion-desired bit, and its question.
    public static func refusal(_ m: [UInt8], _ query: DNSQuery, code: ResponseCode) -> [UInt8] {
        var r = Array(m[0..<query.questionEnd])
        r[2] = 0x80 | (m[2] & 0x01)  // QR, opcode 0, RD as asked
        r[3] = 0x80 | code.rawValue  // RA
        for i in 6..<12 { r[i] = 0 }  // no answer, authority or additional records
        return r
    }

    /// A response with `addresses` for `query`, as a test's server answers.
    public static func answer(_ m: [UInt8], _ query: DNSQuery, addresses: [IPv4Address], ttl: UInt32) -> [UInt8] {
        var r = Array(m[0..<query.questionEnd])
        r[2] = 0x84 | (m[2] & 0x01)  // QR, AA, RD as asked
        r[3] = 0x80
        r[6] = UInt8(addresses.count >> 8)
        r[7] = UInt8(addresses.count & 0xff)
        for i in 8..<12 { r[i] = 0 }
        for a in addresses {
            r += [0xc0, 12, 0, 1, 0, 1]  // the question's name, A, IN
            r += [UInt8(ttl >> 24), UInt8((ttl >> 16) & 0xff), UInt8((ttl >> 8) & 0xff), UInt8(ttl & 0xff), 0, 4]
            r += [
                UInt8(a.value >> 24), UInt8((a.value >> 16) & 0xff), UInt8((a.value >> 8) & 0xff),
                UInt8(a.value & 0xff),
            ]
        }
        return r
    }

    /// The name at `start` and where its encoding ends there (after the first pointer, if
    /// any); nil for a name that runs past the message, loops, or is too long, and when
    /// `strict` for one with a label byte that is a dot, a backslash or unprintable.
    static func name(_ m: [UInt8], at start: Int, strict: Bool = false) -> (String, Int)? {
        var labels: [String] = []
        var at = start
        var end: Int?
        var jumps = 0
        var length = 0
        while true {
            guard at < m.count else { return nil }
            let n = Int(m[at])
            switch n & 0xc0 {
            case 0:
                if n == 0 {
                    return (labels.joined(separator: "."), end ?? at + 1)
                }
                guard at + 1 + n <= m.count else { return nil }
                length += n + 1
                guard length <= 255 else { return nil }
                if strict,
                    !m[(at + 1)..<(at + 1 + n)].allSatisfy({ (0x21...0x7e).contains($0) && $0 != 0x2e && $0 != 0x5c })
                {
                    return nil
                }
                labels.append(String(decoding: m[(at + 1)..<(at + 1 + n)], as: UTF8.self).lowercased())
                at += 1 + n
            case 0xc0:
                guard at + 1 < m.count, jumps < 32 else { return nil }
                if end == nil { end = at + 2 }
                at = (n & 0x3f) << 8 | Int(m[at + 1])
                jumps += 1
            default:
                return nil
            }
        }
    }

    static func u16(_ m: [UInt8], _ i: Int) -> UInt16 { UInt16(m[i]) << 8 | UInt16(m[i + 1]) }
    static func u32(_ m: [UInt8], _ i: Int) -> UInt32 { UInt32(u16(m, i)) << 16 | UInt32(u16(m, i + 2)) }
}
