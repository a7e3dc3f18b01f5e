// The storage process's control protocol: one typed call, one typed reply, each a frame of a
// 4-byte big-endian length and its JSON. A connection carries calls one at a time; a caller
// that wants several at once opens several (StoreClient keeps a few).
import BlockStore
import Foundation
import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

/// A request to the storage process.
public enum StoreCall: Codable, Sendable, Equatable {
    /// Who is there: answered with `.hello`.
    case hello
    /// The store's default codec.
    case defaultCodec
    /// Every file and snapshot.
    case list
    /// Whether a file exists.
    case exists(String)
    /// A new sparse file.
    case make(String, blockSize: Int?, size: UInt64)
    /// A file's size.
    case size(String)
    /// A file's bytes that hold data.
    case allocated(String)
    /// An O(1) writable copy.
    case clone(String, to: String)
    /// An O(1) read-only copy.
    case snapshot(String, as: String)
    /// One file takes another's contents.
    case replaceContents(of: String, with: String)
    /// Removes a file.
    case delete(String)
    /// A new file from a host file's bytes.
    case importFile(String, fromHostPath: String)
    /// How a file's blocks are stored.
    case compressionStats(String)
    /// Re-encodes a file's blocks; cancelled when the caller closes the connection.
    case recompress(String, codec: String)
    /// Verifies every reachable node and block (with `repair`, quarantines damaged ones):
    /// answered with `.fsck` once the whole store was read.
    case fsck(repair: Bool)
    /// Unmount, close the store and exit (the reply comes first).
    case shutdown
}

/// Who answered: the storage process's pid and what it serves.
public struct StoreHello: Codable, Sendable, Equatable {
    /// The storage process's pid.
    public var pid: Int32
    /// The store's directory.
    public var storeDirectory: String
    /// Where its files are mounted.
    public var mountpoint: String
    /// The protocol's version; a client refuses another.
    public var version: Int

    /// This build's protocol version.
    public static let currentVersion = 1
}

/// A `FurcateError` as it crosses the socket (its underlying cause as text).
public struct WireError: Codable, Sendable, Equatable {
    /// The error's code.
    public var code: String
    /// Its message.
    public var message: String
    /// The path, offset, operation and errno it carried.
    public var path: String?, operation: String?
    /// The offset it carried.
    public var offset: UInt64?
    /// The errno it carried.
    public var errno: Int32?

    /// `error` for the wire: a `FurcateError` keeps its fields, anything else becomes `.io`.
    public init(_ error: any Error) {
        let e = error as? FurcateError ?? FurcateError(.io, "\(error)")
        code = e.code.rawValue
        message = e.message
        path = e.path
        operation = e.operation
        offset = e.offset
        errno = e.errno
    }

    /// The error again, as the caller sees it.
    public var error: FurcateError {
        FurcateError(.init(code), message, path: path, offset: offset, operation: operation, errno: errno)
    }
}

/// An answer from the storage process.
public enum StoreReply: Codable, Sendable, Equatable {
    /// Done, nothing to say.
    case ok
    /// A yes or no.
    case bool(Bool)
    /// A byte count.
    case bytes(UInt64)
    /// A listing.
    case files([FileInfo])
    /// Compression figures.
    case stats(CompressionStats)
    /// A codec's spelling.
    case codec(String)
    /// Who answered.
    case hello(StoreHello)
    /// What fsck found.
    case fsck(FsckReport)
    /// The call failed.
    case failed(WireError)
}

/// Frames on a connected stream socket.
enum Frame {
    /// Largest frame accepted: a listing of ~100,000 files fits; a garbage length does not
    /// make us allocate gigabytes.
    static let maxBytes = 64 << 20

    static func send<T: Encodable>(_ value: T, on fd: Int32) throws {
        let body = try JSONEncoder().encode(value)
        var frame = [UInt8](repeating: 0, count: 4)
        let n = UInt32(body.count)
        frame[0] = UInt8(n >> 24)
        frame[1] = UInt8((n >> 16) & 0xff)
        frame[2] = UInt8((n >> 8) & 0xff)
        frame[3] = UInt8(n & 0xff)
        frame.append(contentsOf: body)
        try UnixSocket.writeAll(fd, frame)
    }

    /// The next frame's value, or nil at a clean end of stream (between frames).
    static func receive<T: Decodable>(_ type: T.Type, on fd: Int32) throws -> T? {
        var header = [UInt8](repeating: 0, count: 4)
        guard try readExactly(fd, &header, allowEOF: true) else { return nil }
        let n = Int(header[0]) << 24 | Int(header[1]) << 16 | Int(header[2]) << 8 | Int(header[3])
        guard n <= maxBytes else {
            throw FurcateError(.invalidArgument, "a store control frame of \(n) bytes is over the \(maxBytes) limit")
        }
        var body = [UInt8](repeating: 0, count: n)
        guard try readExactly(fd, &body, allowEOF: false) else { return nil }
        do { return try JSONDecoder().decode(T.self, from: Data(body)) } catch {
            throw FurcateError(.invalidArgument, "a malformed store control frame: \(error)")
        }
    }

    /// Fills `buffer`; false at end of stream before its first byte when `allowEOF`.
    private static func readExactly(_ fd: Int32, _ buffer: inout [UInt8], allowEOF: Bool) throws -> Bool {
        var done = 0
        while done < buffer.count {
            let n = buffer.withUnsafeMutableBytes { b in
                recv(fd, UnsafeMutableRawBufferPointer(rebasing: b[done...]).baseAddress, b.count - done, 0)
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw FurcateError(.unavailable, "the storage process's connection failed", errno: errno)
            }
            if n == 0 {
                if done == 0 && allowEOF { return false }
                throw FurcateError(.unavailable, "the storage process closed the connection mid-frame")
            }
            done += n
        }
        return true
    }
}
