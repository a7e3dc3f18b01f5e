// swift-tools-version:6.1
// Micro-benchmarks of BlockStore's hot paths (ordo-one/benchmark). Run from this directory:
//   swift package benchmark
// System benchmarks with same-run baselines are `furcate bench` (see docs/BENCHMARKS.md).
import Foundation
import PackageDescription

// A path dependency's identity is its directory name, which depends on where it was cloned.
let furcatePackage = URL(fileURLWithPath: Context.packageDirectory).deletingLastPathComponent().lastPathComponent

let package = Package(
    name: "FurcateBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: "../"),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "BlockStoreBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "BlockStore", package: furcatePackage),
            ],
            path: "Benchmarks/BlockStoreBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        )
    ],
    swiftLanguageModes: [.v6]
)
