import BlockStore
import Foundation
import FurcateCore
import FurcateTestSupport
import StoreServer
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The storage process's control socket against a real store: every call answers as the
/// in-process store would, errors keep their codes, and a bad frame is refused.
@Suite(.ownThread) struct StoreServerTests {
    let dir = TempDir("storesrv")

    func serve() throws -> (BlockStore, StoreServer, StoreClient) {
        let store = try BlockStore.create(at: dir.sub("store"))
        let server = try StoreServer(
            store: store, mountpoint: dir.sub("mnt"), socketPath: dir.sub("s.sock"), onShutdown: {})
        return (store, server, try StoreClient(socketPath: dir.sub("s.sock")))
    }

    @Test func everyCallAnswersAsTheStoreDoes() throws {
        let (store, server, client) = try serve()
        defer {
            server.stop()
            store.close()
        }
        #expect(client.hello.pid == getpid() && client.hello.mountpoint == dir.sub("mnt"))
        #expect(try client.defaultCodec == store.defaultCodec)
        try client.makeFile("a", blockSize: nil, size: 1 << 20)
        #expect(try client.fileExists("a") && !(try client.fileExists("b")))
        #expect(try client.fileSize("a") == 1 << 20)
        try store.file("a").write(Array(repeating: 7, count: 70_000), at: 0)
        try store.file("a").sync()
        #expect(try client.allocatedBytes("a") == (try store.allocatedBytes("a")))
        try client.cloneFile("a", to: "b")
        try client.snapshotFile("a", as: "a.snap")
        #expect(try store.file("a.snap").isSnapshot)
        #expect(try store.file("b").read(at: 0, count: 3) == [7, 7, 7])
        try client.makeFile("c", blockSize: nil, size: 0)
        try client.replaceFileContents(of: "c", with: "a.snap")
        #expect(try store.file("c").read(at: 69_999, count: 1) == [7])
        try client.makeFile("e", blockSize: 4096, size: 0)
        #expect(throws: FurcateError.self, "contents of another block size are refused, not misread") {
            try client.replaceFileContents(of: "e", with: "a.snap")
        }
        let host = dir.sub("host.bin")
        try Data(repeating: 9, count: 5000).write(to: URL(fileURLWithPath: host))
        try client.importFile("d", fromHostPath: host)
        #expect(try store.file("d").read(at: 4999, count: 1) == [9])
        #expect(try client.compressionStats("a.snap") == (try store.compressionStats("a.snap")))
        let stats = try client.recompressFile("a.snap", codec: .zstd(level: 3)) { false }
        #expect(stats.blocks > 0)
        #expect(Set(try client.listFiles().map(\.name)) == ["a", "a.snap", "b", "c", "d", "e"])
        try client.deleteFile("b")
        #expect(!(try store.exists("b")))
    }

    @Test func errorsKeepTheirCodeAndMessage() throws {
        let (store, server, client) = try serve()
        defer {
            server.stop()
            store.close()
        }
        #expect {
            try client.fileSize("nope")
        } throws: { ($0 as? FurcateError)?.code == .notFound }
        try client.makeFile("a", blockSize: nil, size: 0)
        #expect {
            try client.makeFile("a", blockSize: nil, size: 0)
        } throws: { ($0 as? FurcateError)?.code == .exists }
        #expect {
            try client.importFile("x", fromHostPath: dir.sub("missing"))
        } throws: { ($0 as? FurcateError)?.code == .notFound }
        #expect(!(try store.exists("x")), "a failed import leaves no file")
        // Still usable after errors.
        #expect(try client.fileExists("a"))
    }

    @Test func aMalformedFrameIsRefusedAndTheServerGoesOn() throws {
        let (store, server, client) = try serve()
        defer {
            server.stop()
            store.close()
        }
        for garbage: [UInt8] in [[0xff, 0xff, 0xff, 0xff], [0, 0, 0, 3] + Array("{x}".utf8)] {
            let fd = try UnixSocket.connect(dir.sub("s.sock"), deadline: .now + .seconds(5))
            defer { close(fd) }
            try UnixSocket.writeAll(fd, garbage)
            var reply: [UInt8] = []
            try UnixSocket.readToEnd(fd) { reply += $0 }
            let text = String(decoding: reply.dropFirst(4), as: UTF8.self)
            #expect(text.contains("failed") && text.contains("invalid_argument"), "\(text)")
        }
        #expect(try client.listFiles().isEmpty)
    }

    @Test func aGoneStorageProcessIsUnavailableNotAHang() throws {
        let (store, server, client) = try serve()
        server.stop()
        store.close()
        #expect {
            try client.listFiles()
        } throws: { ($0 as? FurcateError)?.code == .unavailable }
    }
}
