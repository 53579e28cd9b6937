# frozen_string_literal: true

# The installed gem itself: loads with `require`, version equals Cargo's, and is small.
require_relative 'test_helper'
require 'find'

class GemTest < Minitest::Test
  include QDTestHelpers

  def test_installed_gem_is_small_and_versioned_from_cargo
    spec = Gem.loaded_specs['queue_dispatcher']
    assert spec, 'queue_dispatcher is loaded from an installed gem'
    cargo = File.read(File.join(ROOT, 'Cargo.toml'))[/\[workspace\.package\][^\[]*?^version\s*=\s*"([^"]+)"/m, 1]
    assert_equal cargo, spec.version.to_s
    assert_equal cargo, QueueDispatcher::VERSION
    size = 0
    [spec.full_gem_path, spec.extension_dir].each do |dir|
      Find.find(dir) do |f|
        refute_match(%r{cargo-target|/target/release}, f, 'no cargo target dir inside the installed gem')
        size += File.size(f) if File.file?(f)
      end
    end
    assert_operator size, :<, 30 * 1024 * 1024, "installed gem is #{size} bytes"
    assert(Dir[File.join(spec.extension_dir, '**', 'queue_dispatcher_native.so')].any?, 'native extension installed')
  end
end
