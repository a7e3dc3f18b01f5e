import BlockStore
import Foundation
import FurcateCore
import FurcateTestSupport
import Images
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Where scripts/guest-artifacts.sh put the kernel, initramfs and agent.
let guestDir =
    ProcessInfo.processInfo.environment["FURCATE_GUEST_DIR"] ?? (NSHomeDirectory() + "/.local/share/furcate/guest")

/// A store and an image service over a temporary directory.
final class ImageHarness: @unchecked Sendable {
    let tmp = TempDir("images")
    let store: BlockStore
    let service: ImageService

    init(minimumDisk: UInt64 = 256 << 20) throws {
        store = try BlockStore.create(at: tmp.sub("store"))
        var o = ImageServiceOptions(directory: tmp.sub("images"), agentPath: nil)
        let agent = guestDir + "/furcate-agent"
        if FileManager.default.isReadableFile(atPath: agent) { o.agentPath = agent }
        o.minimumDiskBytes = minimumDisk
        service = try ImageService(store: store, options: o)
    }

    deinit { store.close() }

    /// Store files whose names say a build left them half-done, and scratch directories.
    func leftovers() throws -> [String] {
        let files = try store.list().map(\.name).filter { $0.hasPrefix("image-tmp-") }
        let scratch = (try? FileManager.default.contentsOfDirectory(atPath: tmp.sub("images/tmp"))) ?? []
        return files + scratch
    }

    /// Runs debugfs on the image's rootfs (exported to a plain file) and returns its output.
    func debugfs(_ r: ImageRecord, _ cmd: String) throws -> String {
        let out = tmp.sub("export-\(r.storeFile).ext4")
        if !FileManager.default.fileExists(atPath: out) {
            let fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            defer { close(fd) }
            try FileTransfer.exportFile(try store.file(r.storeFile), fd: fd, path: out)
        }
        return try sh(["debugfs", "-R", cmd, out])
    }
}

func errorOf(_ body: () async throws -> Void) async -> FurcateError? {
    do {
        try await body()
        return nil
    } catch let e as FurcateError {
        return e
    } catch {
        return FurcateError(.internalError, "not a FurcateError: \(error)")
    }
}

@Suite(.ownThread) struct ImageServiceTests {
    @Test func anOCILayoutBecomesAnExt4RootfsOnce() async throws {
        let h = try ImageHarness()
        let lay = h.tmp.sub("layout")
        let digest = try TestImage.twoLayerLayout(lay)
        let events = EventLog()
        let r = try await h.service.pull("oci:\(lay):1") { events.add($0) }
        #expect(r.digest == digest)
        #expect(r.layers == 2)
        #expect(r.diskBytes == 1 << 30, "small content gets a whole GB (above the 256 MB floor set here)")
        #expect(r.config.env?.contains("FURCATE_IMAGE_ENV=from-the-image") == true)
        #expect(r.config.workingDir == "/data")
        #expect(try h.store.file(r.storeFile).size == r.diskBytes)
        #expect(events.names.contains("unpacking") && events.names.contains("importing"))
        // The filesystem is sound and holds what the layers say.
        let fsck = h.tmp.sub("fsck.ext4")
        let fd = open(fsck, O_WRONLY | O_CREAT, 0o600)
        try FileTransfer.exportFile(try h.store.file(r.storeFile), fd: fd, path: fsck)
        close(fd)
        _ = try sh(["e2fsck", "-fn", fsck])
        #expect(try h.debugfs(r, "cat /data/hello").contains("hello from layer two"))
        #expect(try h.debugfs(r, "cat /etc/kept.txt").contains("kept"))
        #expect(try h.debugfs(r, "stat /etc/removed.txt").contains("File not found"))
        #expect(try h.debugfs(r, "cat /.furcate/env").contains("FURCATE_IMAGE_ENV=from-the-image"))
        #expect(try h.debugfs(r, "stat /data/hello").contains("Links: 2"))
        // Same digest: the same rootfs, nothing rebuilt; the record survives a restart.
        let again = EventLog()
        let r2 = try await h.service.pull("oci:\(lay):1") { again.add($0) }
        #expect(r2 == r)
        #expect(again.names.contains("reused") && !again.names.contains("unpacking"))
        let reopened = try ImageService(store: h.store, options: h.service.options)
        #expect(try await reopened.image(digest.description).storeFile == r.storeFile)
        #expect(try h.leftovers().isEmpty)
    }

    @Test func dockerArchivesArePulled() async throws {
        let h = try ImageHarness()
        let lay = h.tmp.sub("layout")
        try TestImage.twoLayerLayout(lay)
        let archive = h.tmp.sub("image.tar")
        try sh([
            "skopeo", "--insecure-policy", "copy", "-q", "oci:\(lay):1", "docker-archive:\(archive):test/archive:1",
        ])
        let r = try await h.service.pull("docker-archive:\(archive)")
        #expect(try h.debugfs(r, "cat /data/hello").contains("hello from layer two"))
        #expect(try h.debugfs(r, "stat /opt/old/a.txt").contains("File not found"), "the opaque directory hid a.txt")
        #expect(try h.leftovers().isEmpty)
    }

    @Test func diskSizes() async throws {
        let h = try ImageHarness(minimumDisk: 3 << 30)
        let lay = h.tmp.sub("layout")
        try TestImage.twoLayerLayout(lay)
        let auto = try await h.service.pull("oci:\(lay):1")
        #expect(auto.diskBytes == 3 << 30, "InstaVM's rule: an automatic size is at least 3 GB")
        let small = await errorOf { _ = try await h.service.pull("oci:\(lay):1", diskBytes: 16 << 20) }
        #expect(small?.code == .invalidArgument)
        #expect(small?.message.contains("needs at least 1 GB") == true, "\(String(describing: small))")
        let huge = await errorOf { _ = try await h.service.pull("oci:\(lay):1", diskBytes: 17 << 30) }
        #expect(huge?.code == .invalidArgument)
        let explicit = try await h.service.pull("oci:\(lay):1", diskBytes: 1 << 30)
        #expect(explicit.diskBytes == 1 << 30 && explicit.storeFile != auto.storeFile)
        #expect(try h.leftovers().isEmpty)
    }

    @Test func badLayersFailTheBuildAndLeaveNothing() async throws {
        let h = try ImageHarness()
        // A layer with a ../ member.
        let src = TempDir("evil")
        try writeFile(src.sub("inner/x"), "")
        try writeFile(src.sub("escaped.txt"), "outside\n")
        let tar = src.sub("evil.tar")
        try sh(["tar", "-C", src.sub("inner"), "-P", "-cf", tar, "../escaped.txt"])
        let raw = try bytes(tar)
        let evil = h.tmp.sub("evil-layout")
        try TestImage.layout(evil, tag: "1", layers: [TestImage.Layer(blob: raw, diffID: Digest(of: raw))], env: [])
        let e1 = await errorOf { _ = try await h.service.pull("oci:\(evil):1") }
        #expect(
            e1?.code == .invalidArgument && e1?.message.contains("path traversal") == true, "\(String(describing: e1))")

        // A blob whose bytes are not its digest.
        let lay = h.tmp.sub("layout")
        try TestImage.twoLayerLayout(lay)
        let blobs = try FileManager.default.contentsOfDirectory(atPath: lay + "/blobs/sha256")
        let biggest = try #require(
            blobs.max {
                (try? bytes(lay + "/blobs/sha256/" + $0).count) ?? 0 < (try? bytes(lay + "/blobs/sha256/" + $1).count)
                    ?? 0
            })
        var b = try bytes(lay + "/blobs/sha256/" + biggest)
        b[b.count / 2] ^= 0xff
        try Data(b).write(to: URL(fileURLWithPath: lay + "/blobs/sha256/" + biggest))
        let e2 = await errorOf { _ = try await h.service.pull("oci:\(lay):1") }
        #expect(e2?.code == .damaged && e2?.message.contains("digest mismatch") == true, "\(String(describing: e2))")

        let e3 = await errorOf { _ = try await h.service.pull("oci:\(lay):nosuchtag") }
        #expect(e3?.code == .notFound)
        let e4 = await errorOf { _ = try await h.service.pull("oci:\(h.tmp.sub("nothing-here"))") }
        #expect(e4?.code == .notFound)

        #expect(try h.leftovers().isEmpty)
        #expect(try h.store.list().isEmpty, "no image file is left by a failed build")
        #expect(await h.service.list().isEmpty)
    }
}

@Suite(.enabled(if: registryAvailable), .ownThread) struct RegistryPullTests {
    @Test func anonymousPullAndErrors() async throws {
        let reg = try TestRegistry()
        let h = try ImageHarness()
        let lay = h.tmp.sub("layout")
        let digest = try TestImage.twoLayerLayout(lay)
        try reg.push(layout: lay, tag: "1", as: "test/busybox:1")
        let events = EventLog()
        let r = try await h.service.pull("\(reg.host)/test/busybox:1") { events.add($0) }
        #expect(r.digest == digest, "skopeo pushes the OCI manifest unchanged")
        #expect(r.references == ["\(reg.host)/test/busybox:1"])
        #expect(events.names.contains("layerProgress"))
        #expect(try h.debugfs(r, "cat /data/hello").contains("hello from layer two"))
        // By digest: the same image.
        let byDigest = try await h.service.pull("\(reg.host)/test/busybox@\(digest)")
        #expect(byDigest.storeFile == r.storeFile)

        let unknown = await errorOf { _ = try await h.service.pull("\(reg.host)/test/nothing:1") }
        #expect(unknown?.code == .notFound, "\(String(describing: unknown))")
        let wrongDigest = await errorOf {
            _ = try await h.service.pull("\(reg.host)/test/busybox@sha256:\(String(repeating: "0", count: 64))")
        }
        #expect(wrongDigest?.code == .notFound, "\(String(describing: wrongDigest))")
        let port = try TestRegistry.freePort()
        let unreachable = await errorOf { _ = try await h.service.pull("127.0.0.1:\(port)/test/busybox:1") }
        #expect(unreachable?.code == .unavailable, "\(String(describing: unreachable))")
        #expect(try h.leftovers().isEmpty)
    }

    @Test func basicAuth() async throws {
        let reg = try TestRegistry(user: ("furcate", "s3cret"))
        let h = try ImageHarness()
        let lay = h.tmp.sub("layout")
        try TestImage.twoLayerLayout(lay)
        try reg.push(layout: lay, tag: "1", as: "private/app:1")
        let ref = "\(reg.host)/private/app:1"
        let none = await errorOf { _ = try await h.service.pull(ref) }
        #expect(
            none?.code == .unauthenticated && none?.message.contains("none were given") == true,
            "\(String(describing: none))")
        let wrong = await errorOf {
            _ = try await h.service.pull(ref, credentials: RegistryCredentials(username: "furcate", password: "nope"))
        }
        #expect(
            wrong?.code == .unauthenticated && wrong?.message.contains("refused") == true,
            "\(String(describing: wrong))")
        let r = try await h.service.pull(ref, credentials: RegistryCredentials(username: "furcate", password: "s3cret"))
        #expect(try h.debugfs(r, "cat /data/hello").contains("hello from layer two"))
        #expect(try h.leftovers().isEmpty)
    }
}

extension RegistryPullTests {
    @Test func bearerTokenAuth() async throws {
        let reg = try TestRegistry(user: ("tokenuser", "tok3n"), tokenAuth: true)
        let h = try ImageHarness()
        let lay = h.tmp.sub("layout")
        try TestImage.twoLayerLayout(lay)
        try reg.push(layout: lay, tag: "1", as: "private/tok:1")
        let ref = "\(reg.host)/private/tok:1"
        let none = await errorOf { _ = try await h.service.pull(ref) }
        #expect(
            none?.code == .unauthenticated && none?.message.contains("token service") == true,
            "\(String(describing: none))")
        let wrong = await errorOf {
            _ = try await h.service.pull(ref, credentials: RegistryCredentials(username: "tokenuser", password: "nope"))
        }
        #expect(wrong?.code == .unauthenticated, "\(String(describing: wrong))")
        let before = reg.tokens!.requests
        let r = try await h.service.pull(
            ref, credentials: RegistryCredentials(username: "tokenuser", password: "tok3n"))
        #expect(try h.debugfs(r, "cat /data/hello").contains("hello from layer two"))
        #expect(reg.tokens!.requests > before, "the pull went through the token service")
        #expect(try h.leftovers().isEmpty)
    }
}

let registryAvailable = facilityAvailable("registry tests", unavailable: TestRegistry.unavailable)

/// Pull events as their case names, for checks that a phase happened.
final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private var events: [PullEvent] = []
    func add(_ e: PullEvent) { lock.withLock { events.append(e) } }
    var names: Set<String> {
        lock.withLock { Set(events.map { String(describing: $0).prefix { $0 != "(" } }.map(String.init)) }
    }
}

/// `furcate image pull|ls|rm --data DIR` as a user runs them.
@Suite(.ownThread) struct ImageCommandTests {
    @Test(.enabled(if: FileManager.default.isReadableFile(atPath: guestDir + "/furcate-agent")))
    func pullListRemove() throws {
        let t = TempDir("cli")
        let lay = t.sub("layout")
        let digest = try TestImage.twoLayerLayout(lay)
        let env = ["FURCATE_GUEST_DIR": guestDir]
        let out = try sh([furcateBinary, "image", "pull", "--data", t.sub("data"), "oci:\(lay):1"], env: env)
        #expect(out.contains("unpacking layer 2/2"), "\(out)")
        #expect(out.contains("image-\(digest.hex)"), "\(out)")
        let ls = try sh([furcateBinary, "image", "ls", "--data", t.sub("data")])
        #expect(ls.contains("oci:\(lay):1") && ls.contains(digest.short), "\(ls)")
        let again = try sh([furcateBinary, "image", "pull", "--data", t.sub("data"), "oci:\(lay):1"], env: env)
        #expect(again.contains("already built"), "\(again)")
        try sh([furcateBinary, "image", "rm", "--data", t.sub("data"), digest.short])
        #expect(!(try sh([furcateBinary, "image", "ls", "--data", t.sub("data")])).contains(digest.short))
        // Bad input: a clear message and a failing status.
        #expect(throws: FurcateError.self) {
            try sh([furcateBinary, "image", "pull", "--data", t.sub("data"), "Not/Valid:ref"], env: env)
        }
        let bad =
            (try? sh(
                [furcateBinary, "image", "pull", "--data", t.sub("data"), "--disk-size-gb", "40", "oci:\(lay):1"],
                env: env))
        #expect(bad == nil)
    }
}

extension RegistryPullTests {
    /// A registry on loopback holding the two-layer test image as `REPO:1`, an image service,
    /// and the image's OCI layout.
    func twoLayerImage(_ repo: String) throws -> (TestRegistry, ImageHarness, String) {
        let reg = try TestRegistry()
        let h = try ImageHarness()
        let lay = h.tmp.sub("layout")
        try TestImage.twoLayerLayout(lay)
        try reg.push(layout: lay, tag: "1", as: repo + ":1")
        return (reg, h, lay)
    }

    /// A download the network breaks off mid-blob (a proxy closes the connection after 64 KiB
    /// of answers) is resumed within the same pull, and the image is whole.
    @Test func aDownloadBrokenOffMidBlobIsResumed() async throws {
        let (reg, h, lay) = try twoLayerImage("test/cut")
        let biggest =
            try FileManager.default.contentsOfDirectory(atPath: lay + "/blobs/sha256").map {
                try bytes(lay + "/blobs/sha256/" + $0).count
            }.max() ?? 0
        try #require(biggest > 128 << 10, "the test image needs a blob larger than the cut (\(biggest) bytes)")
        let proxy = try CuttingProxy(to: reg.port, cutAfter: 64 << 10)
        defer { proxy.stop() }
        let r = try await h.service.pull("127.0.0.1:\(proxy.port)/test/cut:1")
        #expect(proxy.didCut, "the proxy never broke a connection off: the test tested nothing")
        #expect(try h.debugfs(r, "cat /data/hello").contains("hello from layer two"))
    }

    /// A download cut short leaves `<hex>.partial`; the next pull asks the registry for the rest
    /// (HTTP range) and the digest still checks out. A damaged partial file costs one restart.
    @Test func interruptedDownloadsResume() async throws {
        let (reg, h, lay) = try twoLayerImage("test/resume")
        // The biggest blob (the busybox layer), cut in half, as a killed pull would leave it.
        let blobs = try FileManager.default.contentsOfDirectory(atPath: lay + "/blobs/sha256")
        let sizes = try blobs.map { ($0, try bytes(lay + "/blobs/sha256/" + $0)) }
        let (hex, full) = try #require(sizes.max { $0.1.count < $1.1.count })
        let cache = h.tmp.sub("images/blobs/sha256")
        try FileManager.default.createDirectory(atPath: cache, withIntermediateDirectories: true)
        try Data(full.prefix(full.count / 2)).write(to: URL(fileURLWithPath: cache + "/" + hex + ".partial"))
        let events = EventLog()
        let r = try await h.service.pull("\(reg.host)/test/resume:1") { events.add($0) }
        #expect(try bytes(cache + "/" + hex) == full)
        #expect(!FileManager.default.fileExists(atPath: cache + "/" + hex + ".partial"))
        #expect(try h.debugfs(r, "cat /data/hello").contains("hello from layer two"))

        // Damaged partial: garbage where the first half should be.
        let h2 = try ImageHarness()
        let cache2 = h2.tmp.sub("images/blobs/sha256")
        try FileManager.default.createDirectory(atPath: cache2, withIntermediateDirectories: true)
        try Data(repeating: 0x5a, count: full.count / 2).write(
            to: URL(fileURLWithPath: cache2 + "/" + hex + ".partial"))
        _ = try await h2.service.pull("\(reg.host)/test/resume:1")
        #expect(try bytes(cache2 + "/" + hex) == full)
    }
}
