// swift-tools-version:6.1
// Furcate: a self-hosted microVM engine whose forks cost one O(1) store clone.
// Modules depend downward only; see docs/ARCHITECTURE.md for the picture.
import PackageDescription

let package = Package(
    name: "furcate",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "furcate", targets: ["furcate"]),
        .executable(name: "furcate-agent", targets: ["furcate-agent"]),
        .library(name: "BlockStore", targets: ["BlockStore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/vapor/multipart-kit", from: "4.7.1"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
    ],
    targets: [
        // C bridges: system libraries from Debian, nothing else.
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CLZ4", pkgConfig: "liblz4", providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CFuse", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),

        // Leaf: the shared error type, locks, sizes, name checks.
        .target(
            name: "FurcateCore",
            dependencies: ["CSpawn", .product(name: "Logging", package: "swift-log")]
        ),
        // Content-addressed copy-on-write block store.
        .target(
            name: "BlockStore",
            dependencies: [
                "FurcateCore", "CZstd", "CLZ4", "CZlib",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // FUSE server over BlockStore: store files as ordinary files for QEMU, mkfs, cp.
        .target(
            name: "StoreFS",
            dependencies: ["FurcateCore", "BlockStore", "CFuse", .product(name: "Logging", package: "swift-log")]
        ),
        // The storage process's control socket: StoreAccess served over it and a client for it,
        // and how `furcate serve` finds, starts and watches that process.
        .target(
            name: "StoreServer",
            dependencies: ["FurcateCore", "BlockStore", "CSpawn", .product(name: "Logging", package: "swift-log")]
        ),
        // VM networks: a namespace, veth pair and tap per VM, the policy in nftables (ip, nft),
        // and each guest's DNS resolver (NIO, sockets made inside the namespaces: CNetns).
        .target(name: "CNetns"),
        .target(
            name: "VMNetwork",
            dependencies: [
                "FurcateCore", "CNetns",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The HTTP ingress: a request's Host header names a VM's port; bytes are spliced through.
        .target(
            name: "Ingress",
            dependencies: [
                "FurcateCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // QEMU processes and QMP; knows files by path only (nothing of the store or HTTP).
        .target(
            name: "Hypervisor",
            dependencies: [
                "FurcateCore", "GuestAgentProtocol", "CSpawn", .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(name: "CSpawn"),
        // The host-guest wire protocol, shared by the agent and the host (FoundationEssentials only).
        .target(name: "GuestAgentProtocol"),
        // The agent inside every guest: one static executable (see scripts/build-agent.sh).
        .target(name: "CAgentInit"),
        // <sys/xattr.h> for the layer applier (not in Swift's Glibc module).
        .target(name: "CSysXattr"),
        .executableTarget(name: "furcate-agent", dependencies: ["GuestAgentProtocol", "CAgentInit", "CSpawn"]),
        // Small SQLite databases of JSON records (VMs, snapshots, images, builds).
        .target(
            name: "RecordStore",
            dependencies: ["FurcateCore", .product(name: "GRDB", package: "GRDB.swift")]
        ),
        // API keys per account, stored hashed.
        .target(
            name: "Accounts",
            dependencies: ["FurcateCore", "RecordStore", .product(name: "Crypto", package: "swift-crypto")]
        ),
        // The VM lifecycle: boot, snapshot, fork, suspend/resume, stop/kill, persistence.
        .target(
            name: "VMService",
            dependencies: [
                "FurcateCore", "BlockStore", "Hypervisor", "GuestAgentProtocol", "RecordStore", "VMNetwork",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // OCI images (registry, OCI layout, docker-archive) -> ext4 rootfs files in the store.
        .target(
            name: "Images",
            dependencies: [
                "FurcateCore", "BlockStore", "CZstd", "CZlib", "CSysXattr", "RecordStore",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Builds: recipes run in a build VM through the agent, snapshotted, cached by template hash.
        .target(
            name: "Builds",
            dependencies: [
                "FurcateCore", "Images", "VMService", "Hypervisor", "GuestAgentProtocol", "RecordStore",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The use-case layer under every dialect: each operation whole (ownership, activity,
        // wake-up, records, policies), snapshot records and VM policies.
        .target(
            name: "FurcateEngine",
            dependencies: [
                "FurcateCore", "VMService", "Builds", "Images", "Accounts", "RecordStore", "Hypervisor",
                "GuestAgentProtocol", "Ingress", "VMNetwork",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The HTTP API (Hummingbird): dialects that parse and render — Freestyle at /v1, InstaVM
        // at /instavm — over the engine, API keys.
        .target(
            name: "APIServer",
            dependencies: [
                "FurcateCore", "FurcateEngine", "Images", "VMService", "Builds", "Accounts", "GuestAgentProtocol",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "MultipartKit", package: "multipart-kit"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ],
            resources: [.embedInCode("Resources/openapi.json")]
        ),
        // System benchmarks behind `furcate bench`, each with a same-run baseline.
        .target(
            name: "FurcateBench",
            dependencies: [
                "FurcateCore", "BlockStore", "StoreFS", "StoreServer", "Hypervisor", "VMService", "GuestAgentProtocol",
                "Images", "Builds", "Accounts", "FurcateEngine", "APIServer", "VMNetwork",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        // @main: argument parsing and wiring only.
        .executableTarget(
            name: "furcate",
            dependencies: [
                "FurcateCore", "BlockStore", "StoreFS", "StoreServer", "FurcateBench", "Hypervisor", "VMService",
                "Images",
                "Builds", "GuestAgentProtocol", "Accounts", "FurcateEngine", "APIServer", "CSpawn", "VMNetwork",
                "Ingress",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Helpers shared by the test targets (temp dirs, the built binary).
        .target(
            name: "FurcateTestSupport", dependencies: ["FurcateCore", "StoreFS", "CSpawn", "VMNetwork"],
            path: "Tests/FurcateTestSupport"),
        .testTarget(name: "FurcateCoreTests", dependencies: ["FurcateCore", "FurcateTestSupport"]),
        .testTarget(name: "FurcateBenchTests", dependencies: ["FurcateBench"]),
        .testTarget(name: "VMNetworkTests", dependencies: ["VMNetwork", "FurcateCore", "FurcateTestSupport"]),
        .testTarget(name: "AccountsTests", dependencies: ["Accounts", "FurcateCore", "FurcateTestSupport"]),
        .testTarget(
            name: "APIServerTests",
            dependencies: [
                "APIServer", "FurcateEngine", "Accounts", "Builds", "Images", "VMService", "StoreFS", "BlockStore",
                "Hypervisor", "FurcateCore", "FurcateTestSupport", "Ingress", "VMNetwork",
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
            ]
        ),
        .testTarget(
            name: "StoreServerTests", dependencies: ["StoreServer", "BlockStore", "FurcateCore", "FurcateTestSupport"]),
        .testTarget(name: "BlockStoreTests", dependencies: ["BlockStore", "FurcateCore", "FurcateTestSupport"]),
        .testTarget(
            name: "GuestAgentTests",
            dependencies: [
                "GuestAgentProtocol", "Hypervisor", "FurcateCore", "FurcateTestSupport", "furcate-agent", "CSpawn",
            ]
        ),
        .testTarget(
            name: "VMServiceTests",
            dependencies: [
                "VMService", "Hypervisor", "GuestAgentProtocol", "StoreFS", "BlockStore", "FurcateCore",
                "FurcateTestSupport", "VMNetwork",
            ]
        ),
        .testTarget(
            name: "ImagesTests",
            dependencies: [
                "Images", "Builds", "VMService", "CSysXattr", .product(name: "Crypto", package: "swift-crypto"),
                "Hypervisor", "GuestAgentProtocol", "StoreFS", "BlockStore", "FurcateCore", "FurcateTestSupport",
            ]
        ),
        .testTarget(
            name: "StoreFSTests", dependencies: ["StoreFS", "BlockStore", "FurcateCore", "CFuse", "FurcateTestSupport"]),
    ],
    swiftLanguageModes: [.v6]
)
