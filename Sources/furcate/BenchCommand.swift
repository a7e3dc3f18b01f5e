import ArgumentParser

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "System benchmarks, each against a baseline measured in the same run.",
        subcommands: [])
}
