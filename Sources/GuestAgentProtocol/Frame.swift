// GuestAgentProtocol — the wire protocol between the host and `furcate-agent` in every guest,
// over the virtio-serial port `furcate.0` (a unix socket on the host). Shared by both sides;
// uses FoundationEssentials only, so the static agent stays small. docs/AGENT.md describes it.
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// One frame: a 12-byte header and a JSON payload.
///
/// ```
/// "FA" | version u8 | kind u8 | id u32 LE | length u32 LE | payload (length bytes)
/// kind: 1 request, 2 response, 3 event (a stream item; the response for the same id ends it)
/// ```
/// `id` pairs a response with its request; the host picks it, unique among its requests in
/// flight. A reader never allocates more than `maxPayload` for one frame.
public struct Frame: Sendable, Equatable {
    public enum Kind: UInt8, Sendable {
        case request = 1
        /// The one final answer to a request (it ends a stream).
        case response = 2
        /// One item of a stream (exec output, a file event, a stats sample) before the response.
        case event = 3
    }

    public static let magic: (UInt8, UInt8) = (0x46, 0x41)  // "FA"
    public static let version: UInt8 = 1
    public static let headerSize = 12
    /// Largest payload either side accepts (a file chunk is at most 4 MiB before base64).
    public static let maxPayload = 16 << 20

    public var kind: Kind
    public var id: UInt32
    public var payload: [UInt8]

    public init(kind: Kind, id: UInt32, payload: [UInt8]) {
        self.kind = kind
        self.id = id
        self.payload = payload
    }

    /// The frame's bytes.
    public func encoded() -> [UInt8] {
        var out: [UInt8] = [Self.magic.0, Self.magic.1, Self.version, kind.rawValue]
        out.reserveCapacity(Self.headerSize + payload.count)
        withUnsafeBytes(of: id.littleEndian) { out.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt32(payload.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(contentsOf: payload)
        return out
    }
}

/// Why a byte stream is not a valid frame sequence. The stream cannot be resynchronized after
/// one: the reader closes it.
public struct FrameError: Error, Sendable, CustomStringConvertible {
    public var description: String
}

/// Splits a byte stream into frames.
public struct FrameDecoder: Sendable {
    private var buffer: [UInt8] = []

    public init() {}

    /// Adds bytes read from the stream.
    public mutating func append<C: Collection>(_ bytes: C) where C.Element == UInt8 { buffer.append(contentsOf: bytes) }

    /// The next complete frame, nil when more bytes are needed.
    /// - Throws: `FrameError` for a bad magic, version, kind or an oversized payload.
    public mutating func next() throws -> Frame? {
        guard buffer.count >= Frame.headerSize else { return nil }
        guard buffer[0] == Frame.magic.0, buffer[1] == Frame.magic.1 else {
            throw FrameError(description: "bad frame magic \(buffer[0]) \(buffer[1])")
        }
        guard buffer[2] == Frame.version else { throw FrameError(description: "unsupported protocol version \(buffer[2])") }
        guard let kind = Frame.Kind(rawValue: buffer[3]) else { throw FrameError(description: "unknown frame kind \(buffer[3])") }
        let id = Self.u32(buffer, 4)
        let length = Int(Self.u32(buffer, 8))
        guard length <= Frame.maxPayload else {
            throw FrameError(description: "frame payload of \(length) bytes exceeds \(Frame.maxPayload)")
        }
        guard buffer.count >= Frame.headerSize + length else { return nil }
        let payload = Array(buffer[Frame.headerSize..<(Frame.headerSize + length)])
        buffer.removeFirst(Frame.headerSize + length)
        return Frame(kind: kind, id: id, payload: payload)
    }

    private static func u32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
    }
}
