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
/// kind: 1 request, 2 response, 3 event (a stream item; the response for the same id ends it);
/// kind | 0x80: the payload is `json length u32 LE | json | attachment` (raw file bytes)
/// ```
/// `id` pairs a response with its request; the host picks it, unique among its requests in
/// flight. A reader never allocates more than `maxPayload` for one frame.
public struct Frame: Sendable, Equatable {
    /// What a frame carries.
    public enum Kind: UInt8, Sendable {
        case request = 1
        /// The one final answer to a request (it ends a stream).
        case response = 2
        /// One item of a stream (exec output, a file event, a stats sample) before the response.
        case event = 3
    }

    /// The first two bytes of every frame: "FA".
    public static let magic: (UInt8, UInt8) = (0x46, 0x41)  // "FA"
    /// The protocol version both sides speak; a frame of another is refused.
    public static let version: UInt8 = 1
    /// Bytes before the payload: magic, version, kind and flags, id, payload length.
    public static let headerSize = 12
    /// Largest payload either side accepts (a file chunk is at most 4 MiB before base64).
    public static let maxPayload = 16 << 20

    /// Request, response or stream event.
    public var kind: Kind
    /// The request this frame belongs to.
    public var id: UInt32
    /// The JSON message.
    public var payload: [UInt8]
    /// Raw bytes carried beside the JSON (file contents), so they need no base64.
    public var attachment: [UInt8]

    /// Set in the kind byte when the frame carries an attachment: the payload is then
    /// `json length u32 LE | json | attachment`.
    static let attachmentFlag: UInt8 = 0x80

    /// A frame of `kind` for request `id`, with its JSON payload and optional binary attachment.
    public init(kind: Kind, id: UInt32, payload: [UInt8], attachment: [UInt8] = []) {
        self.kind = kind
        self.id = id
        self.payload = payload
        self.attachment = attachment
    }

    /// The frame's bytes.
    public func encoded() -> [UInt8] {
        let hasAttachment = !attachment.isEmpty
        let body = hasAttachment ? 4 + payload.count + attachment.count : payload.count
        var out: [UInt8] = [
            Self.magic.0, Self.magic.1, Self.version, kind.rawValue | (hasAttachment ? Self.attachmentFlag : 0),
        ]
        out.reserveCapacity(Self.headerSize + body)
        withUnsafeBytes(of: id.littleEndian) { out.append(contentsOf: $0) }
        withUnsafeBytes(of: UInt32(body).littleEndian) { out.append(contentsOf: $0) }
        if hasAttachment { withUnsafeBytes(of: UInt32(payload.count).littleEndian) { out.append(contentsOf: $0) } }
        out.append(contentsOf: payload)
        out.append(contentsOf: attachment)
        return out
    }
}

/// Why a byte stream is not a valid frame sequence. The stream cannot be resynchronized after
/// one: the reader closes it.
public struct FrameError: Error, Sendable, CustomStringConvertible {
    /// What is wrong, with the offending value.
    public var description: String
}

/// Splits a byte stream into frames.
public struct FrameDecoder: Sendable {
    private var buffer: [UInt8] = []

    /// A decoder with an empty buffer.
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
        guard buffer[2] == Frame.version else {
            throw FrameError(description: "unsupported protocol version \(buffer[2])")
        }
        let hasAttachment = buffer[3] & Frame.attachmentFlag != 0
        guard let kind = Frame.Kind(rawValue: buffer[3] & ~Frame.attachmentFlag) else {
            throw FrameError(description: "unknown frame kind \(buffer[3])")
        }
        let id = Self.u32(buffer, 4)
        let length = Int(Self.u32(buffer, 8))
        guard length <= Frame.maxPayload else {
            throw FrameError(description: "frame payload of \(length) bytes exceeds \(Frame.maxPayload)")
        }
        guard buffer.count >= Frame.headerSize + length else { return nil }
        let body = buffer[Frame.headerSize..<(Frame.headerSize + length)]
        defer { buffer.removeFirst(Frame.headerSize + length) }
        guard hasAttachment else { return Frame(kind: kind, id: id, payload: Array(body)) }
        guard length >= 4 else { throw FrameError(description: "frame with an attachment is too short") }
        let jsonLength = Int(Self.u32(buffer, Frame.headerSize))
        guard jsonLength <= length - 4 else {
            throw FrameError(description: "attachment frame's JSON length \(jsonLength) exceeds the frame")
        }
        let jsonStart = Frame.headerSize + 4
        return Frame(
            kind: kind, id: id, payload: Array(buffer[jsonStart..<(jsonStart + jsonLength)]),
            attachment: Array(buffer[(jsonStart + jsonLength)..<(Frame.headerSize + length)]))
    }

    private static func u32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
    }
}

// MARK: - messages as frames (file bytes travel as attachments, not base64)

extension AgentRequest {
    /// This request as a frame: a file write's bytes become the attachment.
    public func frame(id: UInt32) throws -> Frame {
        if case .writeFile(let path, let data, let offset, let mode, let createParents) = self, !data.isEmpty {
            let json = try JSONEncoder().encode(
                AgentRequest.writeFile(
                    path: path, data: Data(), offset: offset, mode: mode, createParents: createParents))
            return Frame(kind: .request, id: id, payload: [UInt8](json), attachment: [UInt8](data))
        }
        return Frame(kind: .request, id: id, payload: [UInt8](try JSONEncoder().encode(self)))
    }

    /// The request a frame carries.
    public static func from(_ frame: Frame) throws -> AgentRequest {
        let r = try JSONDecoder().decode(AgentRequest.self, from: Data(frame.payload))
        if !frame.attachment.isEmpty, case .writeFile(let path, _, let offset, let mode, let createParents) = r {
            return .writeFile(
                path: path, data: Data(frame.attachment), offset: offset, mode: mode, createParents: createParents)
        }
        return r
    }
}

extension AgentResponse {
    /// This response as a frame: read bytes become the attachment.
    public func frame(id: UInt32) throws -> Frame {
        if case .data(let data, let size) = self, !data.isEmpty {
            let json = try JSONEncoder().encode(AgentResponse.data(Data(), fileSize: size))
            return Frame(kind: .response, id: id, payload: [UInt8](json), attachment: [UInt8](data))
        }
        return Frame(kind: .response, id: id, payload: [UInt8](try JSONEncoder().encode(self)))
    }

    /// The response a frame carries.
    public static func from(_ frame: Frame) throws -> AgentResponse {
        let r = try JSONDecoder().decode(AgentResponse.self, from: Data(frame.payload))
        if !frame.attachment.isEmpty, case .data(_, let size) = r {
            return .data(Data(frame.attachment), fileSize: size)
        }
        return r
    }
}
