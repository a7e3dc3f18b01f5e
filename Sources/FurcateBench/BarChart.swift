import Foundation

/// A horizontal bar chart as SVG: groups of bars (a subject and its baselines side by side),
/// each bar labelled with its value, on a linear or a log scale — what `furcate bench … --plot`
/// writes, with no dependency beyond text.
public struct BarChart: Sendable {
    /// One bar.
    public struct Bar: Sendable {
        /// Written under the bar.
        public var label: String
        /// Its length, in the chart's unit.
        public var value: Double
        /// The subject's bars are drawn in the accent colour, baselines in grey.
        public var isBaseline: Bool

        /// A bar of `value` labelled `label`; `baseline` draws it grey.
        public init(_ label: String, _ value: Double, baseline: Bool = false) {
            self.label = label
            self.value = value
            self.isBaseline = baseline
        }
    }

    /// Bars drawn together under one title.
    public struct Group: Sendable {
        /// Written above the group.
        public var title: String
        /// The bars, top to bottom.
        public var bars: [Bar]

        /// A group of `bars` titled `title`.
        public init(_ title: String, _ bars: [Bar]) {
            self.title = title
            self.bars = bars
        }
    }

    /// The chart's title.
    public var title: String
    /// The values' unit, written on the axis.
    public var unit: String
    /// Log scale (values spanning orders of magnitude: a fork against a cold boot).
    public var logScale: Bool
    /// The groups, top to bottom.
    public var groups: [Group]

    /// A chart of `groups`.
    public init(title: String, unit: String, logScale: Bool = false, groups: [Group]) {
        self.title = title
        self.unit = unit
        self.logScale = logScale
        self.groups = groups
    }

    static let labelWidth = 260.0
    static let plotWidth = 460.0
    static let barHeight = 18.0
    static let gap = 6.0

    /// The bar's length in pixels: values at or below zero get none.
    func length(_ value: Double, max: Double, min: Double) -> Double {
        guard value > 0, max > 0 else { return 0 }
        guard logScale else { return Self.plotWidth * value / max }
        let lo = log10(Swift.min(min, max) / 2)
        let hi = log10(max)
        return Self.plotWidth * (log10(value) - lo) / Swift.max(hi - lo, 1e-9)
    }

    /// The chart as an SVG document.
    public var svg: String {
        let values = groups.flatMap { $0.bars.map(\.value) }.filter { $0 > 0 }
        let maxValue = values.max() ?? 1
        let minValue = values.min() ?? 1
        var y = 40.0
        var body = ""
        for g in groups {
            body += text(x: 8, y: y + 12, g.title, weight: "bold")
            y += 20
            for b in g.bars {
                let w = length(b.value, max: maxValue, min: minValue)
                body += text(x: 16, y: y + 13, b.label)
                body +=
                    "<rect x=\"\(f(Self.labelWidth))\" y=\"\(f(y))\" width=\"\(f(w))\" height=\"\(f(Self.barHeight))\" fill=\"\(b.isBaseline ? "#9e9e9e" : "#2e7d32")\"/>\n"
                body += text(x: Self.labelWidth + w + 6, y: y + 13, "\(Self.format(b.value)) \(unit)")
                y += Self.barHeight + Self.gap
            }
            y += 10
        }
        let width = Self.labelWidth + Self.plotWidth + 120
        let scale = logScale ? " (log scale)" : ""
        return """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(f(width))" height="\(f(y + 10))" \
            viewBox="0 0 \(f(width)) \(f(y + 10))" font-family="sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            \(text(x: 8, y: 22, title + scale, weight: "bold", size: 15))\(body)</svg>

            """
    }

    func text(x: Double, y: Double, _ s: String, weight: String = "normal", size: Int = 12) -> String {
        "<text x=\"\(f(x))\" y=\"\(f(y))\" font-weight=\"\(weight)\" font-size=\"\(size)\">\(Self.escape(s))</text>\n"
    }

    func f(_ x: Double) -> String { String(format: "%.1f", x) }

    static func format(_ v: Double) -> String {
        v >= 100 ? String(format: "%.0f", v) : v >= 10 ? String(format: "%.1f", v) : String(format: "%.2f", v)
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }
}

extension ForkBenchReport {
    /// Per memory mode: the N-way fork's p50, a single fork's p50 (when rounds ran) and the
    /// restore step, against the same run's cold boot.
    public var chart: BarChart {
        var groups: [BarChart.Group] = []
        for m in modes {
            var bars = [BarChart.Bar("fork ×\(m.count), p50", m.forkP50Millis)]
            if let single = m.sequential.first(where: { $0.name.hasPrefix("fork, end to end") }) {
                bars.append(BarChart.Bar("single fork, p50 (\(m.rounds) in turn)", single.p50Millis))
            }
            if let restore = (m.sequential.isEmpty ? m.phases : m.sequential).first(where: {
                $0.name.hasPrefix("restore")
            }) {
                bars.append(BarChart.Bar("restore step, p50", restore.p50Millis))
            }
            bars.append(BarChart.Bar("cold boot to first response", coldBootMillis, baseline: true))
            groups.append(BarChart.Group("memory mode \(m.memoryMode), warm pool \(m.warmPool)", bars))
        }
        return BarChart(
            title: "Fork until it answers vs a cold boot (\(accelerator), \(memoryMiB) MiB guests)", unit: "ms",
            logScale: true, groups: groups)
    }
}

extension FSBenchReport {
    /// Per fio job: the mount's throughput against tmpfs and ext4 in the same run.
    public var chart: BarChart {
        var groups: [BarChart.Group] = []
        for job in Array(Set(jobs.map(\.job))).sorted() {
            let bars = jobs.filter { $0.job == job }.map {
                BarChart.Bar($0.target, $0.mbps, baseline: $0.target != "mount")
            }
            groups.append(BarChart.Group(job, bars))
        }
        return BarChart(title: "FUSE mount vs tmpfs and ext4 (fio)", unit: "MB/s", groups: groups)
    }
}
