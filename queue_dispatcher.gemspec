# frozen_string_literal: true

# The Ruby gem of queue_dispatcher: `gem build queue_dispatcher.gemspec && gem install
# ./queue_dispatcher-*.gem --local`. It ships the Cargo workspace (engine + Ruby binding) and
# builds the native extension with cargo at install time (bindings-ruby/ext/.../extconf.rb).
# The version is Cargo's workspace version, the one version of the project.

cargo_toml = File.read(File.join(__dir__, 'Cargo.toml'))
version = cargo_toml[/\[workspace\.package\][^\[]*?^version\s*=\s*"([^"]+)"/m, 1] or raise 'no [workspace.package] version in Cargo.toml'

Gem::Specification.new do |s|
  s.name = 'queue_dispatcher'
  s.version = version
  s.summary = 'Background tasks for Ruby on a Rust engine: X.enqueue(queue: "q").method, serial queues, dependencies'
  s.description = 'Enqueue method calls of opted-in job classes and run them in the queue_worker_dispatcher daemon. ' \
                  'Persistent queues in one SQLite file, serial named queues, dependencies across queues and ' \
                  'languages, retries, timeouts, leases with recovery; shared with the Python front end.'
  s.authors = ['queue_dispatcher developers']
  s.license = 'MIT'
  s.required_ruby_version = '>= 3.0'

  s.files = Dir.chdir(__dir__) do
    ['Cargo.toml', 'Cargo.lock', 'queue_dispatcher.gemspec'] +
      Dir['core/Cargo.toml', 'core/{src,benches}/**/*.rs'] +
      Dir['bindings-ruby/Cargo.toml', 'bindings-ruby/src/**/*.rs', 'bindings-ruby/lib/**/*.rb',
          'bindings-ruby/ext/**/extconf.rb', 'bindings-ruby/exe/*']
  end
  s.require_paths = ['bindings-ruby/lib']
  s.bindir = 'bindings-ruby/exe'
  s.executables = ['queue_worker_dispatcher']
  s.extensions = ['bindings-ruby/ext/queue_dispatcher/extconf.rb']
end
