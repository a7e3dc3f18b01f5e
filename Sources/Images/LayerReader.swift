import CZlib
import CZstd
import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

/// Reads a layer blob as its uncompressed tar stream, whatever the compression (gzip, zstd or
/// none — told by the magic bytes, not the media type, which registries get wrong), hashing the
/// uncompressed bytes so the caller can check them against the config's `diff_ids`.
final class LayerReader {
    enum Compression: String { case none, gzip, zstd }

    private let fd: Int32
    let path: String
    private(set) var compression: Compression = .none
    private let inBuf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
    private var inPos = 0
    private var inLen = 0
    private var eof = false
    private var zs = z_stream()
    private var zsOpen = false
    private var zstd: OpaquePointer?
    private var zstdFrameDone = true
    private(set) var verifier = DigestVerifier()

    /// With `raw`, bytes are passed through (and hashed) as stored, whatever their magic.
    init(path: String, raw: Bool = false) throws {
        self.path = path
        fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FurcateError.system("open", errno: errno, path: path) }
        try fill()
        if raw { return }
        if inLen >= 2, inBuf[0] == 0x1f, inBuf[1] == 0x8b {
            compression = .gzip
            let r = inflateInit2_(&zs, 15 + 32, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size))
            guard r == Z_OK else { throw FurcateError(.internalError, "inflateInit2 failed (\(r))") }
            zsOpen = true
        } else if inLen >= 4, inBuf[0] == 0x28, inBuf[1] == 0xb5, inBuf[2] == 0x2f, inBuf[3] == 0xfd {
            compression = .zstd
            zstd = ZSTD_createDStream()
            guard zstd != nil else { throw FurcateError(.internalError, "ZSTD_createDStream failed") }
            ZSTD_initDStream(zstd)
        }
    }

    deinit {
        close(fd)
        inBuf.deallocate()
        if zsOpen { inflateEnd(&zs) }
        if let zstd { ZSTD_freeDStream(zstd) }
    }

    private func fill() throws {
        if inPos < inLen || eof { return }
        while true {
            let n = Glibc.read(fd, inBuf.baseAddress, inBuf.count)
            if n < 0 {
                if errno == EINTR { continue }
                throw FurcateError.system("read", errno: errno, path: path)
            }
            inPos = 0
            inLen = n
            if n == 0 { eof = true }
            return
        }
    }

    /// Fills `out` with uncompressed bytes; returns how many (0 only at the end of the stream).
    func read(into out: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = try readRaw(into: out)
        verifier.update(UnsafeRawBufferPointer(rebasing: out[0..<n]))
        return n
    }

    private func readRaw(into out: UnsafeMutableRawBufferPointer) throws -> Int {
        while true {
            try fill()
            switch compression {
            case .none:
                if eof { return 0 }
                let n = min(out.count, inLen - inPos)
                if n > 0, let to = out.baseAddress, let from = inBuf.baseAddress {
                    to.copyMemory(from: from + inPos, byteCount: n)
                }
                inPos += n
                return n
            case .gzip:
                if eof {
                    guard !zsOpenMidStream else { throw truncated() }
                    return 0
                }
                zs.next_in = inBuf.baseAddress?.advanced(by: inPos).assumingMemoryBound(to: Bytef.self)
                zs.avail_in = uInt(inLen - inPos)
                zs.next_out = out.baseAddress?.assumingMemoryBound(to: Bytef.self)
                zs.avail_out = uInt(out.count)
                let r = inflate(&zs, Z_NO_FLUSH)
                inPos = inLen - Int(zs.avail_in)
                let produced = out.count - Int(zs.avail_out)
                switch r {
                case Z_OK, Z_BUF_ERROR:
                    zsOpenMidStream = true
                case Z_STREAM_END:
                    // Concatenated gzip members (pigz, some tools) continue after a reset.
                    inflateReset(&zs)
                    zsOpenMidStream = false
                default:
                    throw FurcateError(.damaged, "layer \(path) is not valid gzip (inflate error \(r))", path: path)
                }
                if produced > 0 { return produced }
            case .zstd:
                if eof {
                    guard zstdFrameDone else { throw truncated() }
                    return 0
                }
                var input = ZSTD_inBuffer(src: inBuf.baseAddress.map { $0 + inPos }, size: inLen - inPos, pos: 0)
                var output = ZSTD_outBuffer(dst: out.baseAddress, size: out.count, pos: 0)
                let r = ZSTD_decompressStream(zstd, &output, &input)
                if ZSTD_isError(r) != 0 {
                    throw FurcateError(
                        .damaged, "layer \(path) is not valid zstd (\(String(cString: ZSTD_getErrorName(r))))",
                        path: path)
                }
                zstdFrameDone = r == 0
                inPos += input.pos
                if output.pos > 0 { return output.pos }
            }
        }
    }

    private var zsOpenMidStream = false

    private func truncated() -> FurcateError {
        FurcateError(
            .damaged, "layer \(path) ends in the middle of its \(compression.rawValue) stream (truncated blob)",
            path: path)
    }

    /// Reads and hashes whatever is left (tar padding after the end marker belongs to the digest).
    func drain() throws {
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 16)
        defer { buf.deallocate() }
        while try read(into: buf) > 0 {}
    }
}
