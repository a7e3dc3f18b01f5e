import Foundation
import FurcateCore

/// A Dockerfile without a build context (Freestyle's `baseImage.dockerfileContent`) as a
/// recipe: FROM names the base image, RUN/ENV/WORKDIR/USER become steps in order; ARG and ENV
/// values are substituted (`$NAME`, `${NAME}`, `${NAME:-default}`); LABEL, SHELL, CMD and
/// ENTRYPOINT are kept as the image's metadata. COPY and ADD need a context and fail clearly.
public struct Dockerfile: Sendable {
    /// What the Dockerfile builds, as a recipe.
    public var recipe: BuildRecipe
    /// LABEL pairs, kept as the image's metadata.
    public var labels: [String: String] = [:]
    /// CMD, kept as the image's metadata.
    public var cmd: [String]?
    /// ENTRYPOINT, kept as the image's metadata.
    public var entrypoint: [String]?
    /// The last USER, kept as the image's metadata.
    public var user: String?

    /// - Throws: `.invalidArgument` naming the line and the problem.
    public init(parsing text: String) throws {
        var from: String?
        var steps: [BuildStep] = []
        var args: [String: String] = [:]
        var env: [String: String] = [:]
        var shell = ["/bin/sh", "-c"]
        var workdir: String?
        var user: String?
        var labels: [String: String] = [:]
        var cmd: [String]?
        var entrypoint: [String]?

        for (lineNo, raw) in Self.logicalLines(text) {
            func bad(_ why: String) -> FurcateError {
                FurcateError(.invalidArgument, "Dockerfile line \(lineNo): \(why)")
            }
            let trimmed = raw.drop { $0.isWhitespace }
            let keyword = trimmed.prefix { !$0.isWhitespace }.uppercased()
            let rest = String(trimmed.dropFirst(keyword.count).drop { $0.isWhitespace })
            let vars = args.merging(env) { $1 }
            func sub(_ s: String) throws -> String { try Self.substitute(s, vars, line: lineNo) }
            if from == nil && keyword != "FROM" && keyword != "ARG" {
                throw bad("\(keyword) before FROM")
            }
            switch keyword {
            case "FROM":
                guard from == nil else { throw bad("multi-stage builds (a second FROM) are not supported") }
                var words = rest.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
                while let w = words.first, w.hasPrefix("--") {
                    if w.hasPrefix("--platform=") && w != "--platform=linux/amd64" {
                        throw bad("only linux/amd64 images run here, not \(w.dropFirst(11))")
                    }
                    words.removeFirst()
                }
                guard words.count == 1 || (words.count == 3 && words[1].uppercased() == "AS") else {
                    throw bad("FROM takes one image (FROM IMAGE [AS NAME])")
                }
                let image = try sub(words[0])
                guard image != "scratch" else {
                    throw bad("FROM scratch has nothing to boot; start from an image with a shell")
                }
                from = image
            case "RUN":
                guard !rest.isEmpty else { throw bad("RUN needs a command") }
                let visible = args.merging(env) { $1 }  // ARG values are environment variables of RUN, as in Docker
                let runEnv = visible.isEmpty ? nil : visible
                if let argv = try Self.jsonArray(rest, line: lineNo) {
                    guard !argv.isEmpty else { throw bad("RUN [] runs nothing") }
                    // Exec form: no shell; quoted so /bin/sh runs exactly these words.
                    steps.append(
                        .run(
                            command: argv.map(Self.shellQuote).joined(separator: " "), shell: nil, user: user,
                            workdir: workdir, env: runEnv))
                } else {
                    steps.append(
                        .run(
                            command: rest, shell: shell == ["/bin/sh", "-c"] ? nil : shell, user: user,
                            workdir: workdir, env: runEnv))
                }
            case "ENV":
                let pairs = try Self.keyValues(rest, line: lineNo, what: "ENV")
                var added: [String: String] = [:]
                for (k, v) in pairs {
                    let value = try Self.substitute(v, args.merging(env) { $1 }, line: lineNo)
                    env[k] = value
                    added[k] = value
                }
                steps.append(.env(added))
            case "ARG":
                for (k, v) in try Self.keyValues(rest, line: lineNo, what: "ARG", valueOptional: true)
                where args[k] == nil {
                    args[k] = try Self.substitute(v, args, line: lineNo)
                }
            case "WORKDIR":
                let w = try sub(rest.trimmingCharacters(in: .whitespaces))
                guard !w.isEmpty else { throw bad("WORKDIR needs a path") }
                let abs = w.hasPrefix("/") ? w : ((workdir ?? "/") as NSString).appendingPathComponent(w)
                let dir = (abs as NSString).standardizingPath
                workdir = dir
                steps.append(.workdir(dir))
            case "USER":
                let u = try sub(rest.trimmingCharacters(in: .whitespaces))
                guard !u.isEmpty, !u.contains(" ") else { throw bad("USER takes one user name or uid") }
                user = u.split(separator: ":").first.map(String.init)
            case "LABEL":
                for (k, v) in try Self.keyValues(rest, line: lineNo, what: "LABEL") { labels[k] = try sub(v) }
            case "SHELL":
                guard let s = try Self.jsonArray(rest, line: lineNo), !s.isEmpty else {
                    throw bad("SHELL takes a JSON array, e.g. [\"/bin/bash\", \"-c\"]")
                }
                shell = s
            case "CMD":
                cmd = try Self.jsonArray(rest, line: lineNo) ?? (shell + [rest])
            case "ENTRYPOINT":
                entrypoint = try Self.jsonArray(rest, line: lineNo) ?? (shell + [rest])
            case "COPY", "ADD":
                throw bad(
                    "\(keyword) needs a build context, and a Dockerfile given as text has none: write files with the spec's additionalFiles, or RUN a download"
                )
            case "EXPOSE", "VOLUME", "STOPSIGNAL", "HEALTHCHECK", "ONBUILD", "MAINTAINER":
                throw bad(
                    "\(keyword) is not supported in a Furcate base image (FROM, RUN, ENV, ARG, WORKDIR, USER, LABEL, SHELL, CMD, ENTRYPOINT are)"
                )
            default:
                throw bad("unknown instruction '\(keyword.prefix(40))'")
            }
        }
        guard let from else { throw FurcateError(.invalidArgument, "the Dockerfile has no FROM") }
        recipe = BuildRecipe(base: .image(from), steps: steps)
        self.labels = labels
        self.cmd = cmd
        self.entrypoint = entrypoint
        self.user = user
    }

    /// Lines joined at trailing backslashes, comments and blank lines dropped; numbered from 1.
    static func logicalLines(_ text: String) -> [(Int, String)] {
        var out: [(Int, String)] = []
        var current = ""
        var start = 0
        for (i, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let l = line.hasSuffix("\r") ? String(line.dropLast()) : String(line)
            let t = l.trimmingCharacters(in: .whitespaces)
            if current.isEmpty && (t.isEmpty || t.hasPrefix("#")) { continue }
            if !current.isEmpty && t.hasPrefix("#") { continue }  // comments inside a continuation
            if current.isEmpty { start = i + 1 }
            if t.hasSuffix("\\") {
                current += String(t.dropLast()) + " "
            } else {
                current += t
                out.append((start, current))
                current = ""
            }
        }
        if !current.isEmpty { out.append((start, current)) }
        return out
    }

    /// A JSON array of strings (exec form), or nil when the text is not one.
    static func jsonArray(_ s: String, line: Int) throws -> [String]? {
        let t = s.trimmingCharacters(in: .whitespaces)
        guard t.hasPrefix("[") else { return nil }
        guard let a = try? JSONDecoder().decode([String].self, from: Data(t.utf8)) else {
            // Docker treats a malformed array as shell form; be strict instead.
            throw FurcateError(
                .invalidArgument, "Dockerfile line \(line): '\(t.prefix(80))' is not a JSON array of strings")
        }
        return a
    }

    /// `K=V K2="V 2"` pairs, or the legacy `K V` form (one pair).
    static func keyValues(_ s: String, line: Int, what: String, valueOptional: Bool = false) throws -> [(
        String, String
    )] {
        let t = s.trimmingCharacters(in: .whitespaces)
        guard !t.isEmpty else { throw FurcateError(.invalidArgument, "Dockerfile line \(line): \(what) needs a name") }
        let firstWord = t.prefix { !$0.isWhitespace }
        if !firstWord.contains("=") {
            let rest = t.dropFirst(firstWord.count).trimmingCharacters(in: .whitespaces)
            if rest.isEmpty && !valueOptional {
                throw FurcateError(.invalidArgument, "Dockerfile line \(line): \(what) \(firstWord) needs a value")
            }
            return [(String(firstWord), unquote(rest))]
        }
        var out: [(String, String)] = []
        var i = t.startIndex
        while i < t.endIndex {
            while i < t.endIndex, t[i].isWhitespace { i = t.index(after: i) }
            guard i < t.endIndex else { break }
            var key = ""
            while i < t.endIndex, t[i] != "=", !t[i].isWhitespace { key.append(t[i]); i = t.index(after: i) }
            var value = ""
            if i < t.endIndex, t[i] == "=" {
                i = t.index(after: i)
                var quote: Character?
                while i < t.endIndex {
                    let c = t[i]
                    if let q = quote {
                        if c == q {
                            quote = nil
                        } else if c == "\\", q == "\"", t.index(after: i) < t.endIndex {
                            i = t.index(after: i)
                            value.append(t[i])
                        } else {
                            value.append(c)
                        }
                    } else if c == "\"" || c == "'" {
                        quote = c
                    } else if c.isWhitespace {
                        break
                    } else if c == "\\", t.index(after: i) < t.endIndex {
                        i = t.index(after: i)
                        value.append(t[i])
                    } else {
                        value.append(c)
                    }
                    i = t.index(after: i)
                }
                guard quote == nil else {
                    throw FurcateError(.invalidArgument, "Dockerfile line \(line): an unclosed quote in \(what)")
                }
            } else if !valueOptional {
                throw FurcateError(.invalidArgument, "Dockerfile line \(line): \(what) \(key) needs =VALUE")
            }
            guard !key.isEmpty else {
                throw FurcateError(.invalidArgument, "Dockerfile line \(line): \(what) has an empty name")
            }
            out.append((key, value))
        }
        return out
    }

    static func unquote(_ s: String) -> String {
        if s.count >= 2, let f = s.first, f == "\"" || f == "'", s.last == f { return String(s.dropFirst().dropLast()) }
        return s
    }

    /// `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME:+alt}`; `\$` is a literal dollar.
    static func substitute(_ s: String, _ vars: [String: String], line: Int) throws -> String {
        var out = ""
        var i = s.startIndex
        func isName(_ c: Character) -> Bool { c == "_" || c.isLetter || c.isNumber }
        while i < s.endIndex {
            let c = s[i]
            if c == "\\", s.index(after: i) < s.endIndex, s[s.index(after: i)] == "$" {
                out.append("$")
                i = s.index(i, offsetBy: 2)
                continue
            }
            guard c == "$", s.index(after: i) < s.endIndex else { out.append(c); i = s.index(after: i); continue }
            var j = s.index(after: i)
            if s[j] == "{" {
                guard let close = s[j...].firstIndex(of: "}") else {
                    throw FurcateError(.invalidArgument, "Dockerfile line \(line): an unclosed ${")
                }
                let inner = String(s[s.index(after: j)..<close])
                if let r = inner.range(of: ":-") {
                    let v = vars[String(inner[..<r.lowerBound])] ?? ""
                    out += v.isEmpty ? String(inner[r.upperBound...]) : v
                } else if let r = inner.range(of: ":+") {
                    let v = vars[String(inner[..<r.lowerBound])] ?? ""
                    out += v.isEmpty ? "" : String(inner[r.upperBound...])
                } else {
                    out += vars[inner] ?? ""
                }
                i = s.index(after: close)
            } else if isName(s[j]) {
                var name = ""
                while j < s.endIndex, isName(s[j]) { name.append(s[j]); j = s.index(after: j) }
                out += vars[name] ?? ""
                i = j
            } else {
                out.append(c)
                i = s.index(after: i)
            }
        }
        return out
    }

    static func shellQuote(_ s: String) -> String { "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'" }
}
