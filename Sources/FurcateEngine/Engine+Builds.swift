import Builds
import FurcateCore

/// Where a local build starts from.
public enum BuildBase: Sendable, Equatable {
    /// The default image (Debian 12 with systemd), from the rootfs tarball next to the guest.
    case defaultImage
    /// An image reference as `ImageService` reads it (registry, `oci:`, `docker-archive:`,
    /// `rootfs:`).
    case image(String)
}

/// The build use case of the machine's own operator (`furcate build`): no account owns what it
/// makes, and its answer is the store's snapshot, which `furcate run --snapshot` restores.
extension Engine {
    /// The recipe of `steps` on `base`, with the build VM's memory and whether the cache is
    /// skipped.
    public func localRecipe(base: BuildBase, steps: [BuildStep], memoryMiB: Int?, skipCache: Bool) -> BuildRecipe {
        var recipe: BuildRecipe
        switch base {
        case .defaultImage:
            recipe = BuildRecipe(
                base: .recipe(BuildService.defaultImageRecipe(rootfsTarball: defaultImage)), steps: steps)
        case .image(let ref):
            recipe = BuildRecipe(base: .image(ref), steps: steps, memoryMiB: memoryMiB)
        }
        recipe.skipCache = skipCache
        return recipe
    }

    /// Builds `recipe` and waits for it to end: `started` hears the planned phases once, then
    /// `phaseEnded` each phase as it ends (polled every 200 ms).
    /// - Returns: the build's record once it ended, succeeded or failed (with its reason).
    /// - Throws: what starting or reading the build throws, and cancellation.
    public func buildLocally(
        _ recipe: BuildRecipe, started: @Sendable (BuildRecord) -> Void, phaseEnded: @Sendable (BuildPhase) -> Void
    ) async throws -> BuildRecord {
        let first = try await builds.start(recipe)
        started(first)
        var shown = 0
        while true {
            let r = try await builds.record(first.buildId)
            for p in r.phases.dropFirst(shown) { phaseEnded(p) }
            shown = r.phases.count
            if r.state == .succeeded || r.state == .failed { break }
            try await Task.sleep(for: .milliseconds(200))
        }
        return try await builds.wait(first.buildId)
    }
}
